"""Settings: defaults, environment over TOML, validation, and generated secrets."""

# The tokens here are test fixtures, not credentials.

from __future__ import annotations

import multiprocessing
import stat
from multiprocessing.queues import Queue as ProcessQueue
from multiprocessing.synchronize import Barrier as ProcessBarrier
from pathlib import Path

import pytest

from nexus_gevent.config import (
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_QUEUE_WORKERS,
    DestinationSettings,
    Settings,
    SourceSettings,
    load_settings,
)
from nexus_gevent.errors import ConfigError
from nexus_gevent.queue import DEFAULT_SIZE as DEFAULT_QUEUE_SIZE

#: gunicorn's graceful_timeout and heartbeat timeout (both 30 s by default).
GUNICORN_TIMEOUT = 30.0


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _write_toml(tmp_path: Path, text: str) -> dict[str, str]:
    """Write `text` as the config file; return an environ pointing at it, with a private data dir."""
    path = tmp_path / "nexus.toml"
    path.write_text(text)
    return {"NEXUS_CONFIG": str(path), "NEXUS_DATA_DIR": str(tmp_path / "data")}


def _load_in_process(environ: dict[str, str], barrier: ProcessBarrier, results: ProcessQueue[tuple[str, str]]) -> None:
    barrier.wait()
    settings = load_settings(environ)
    results.put((settings.sources[0].token, settings.admin_token))


class TestDefaults:
    def test_nothing_set_gives_one_default_source_on_sqlite_under_var(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With an empty environment: data in ./var, source 'default' writing to SQLite there."""
        monkeypatch.chdir(tmp_path)

        settings = load_settings({})

        assert settings.data_dir == Path("var")
        assert [(s.name, s.destination) for s in settings.sources] == [("default", "default")]
        assert settings.destinations == (DestinationSettings("default", "sqlite:///var/nexus.db"),)

    def test_nothing_set_gives_the_contract_defaults(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Every tunable has its documented default when nothing is set."""
        monkeypatch.chdir(tmp_path)

        settings = load_settings({})

        assert settings.queue_size == 10000
        assert settings.queue_workers == 4
        assert settings.delivery_linger == 0.05
        assert settings.max_attempts == 5
        assert settings.initial_backoff == 1.0
        assert settings.drain_timeout == 20.0
        assert settings.max_body_bytes == 1048576
        assert settings.shed_policy == "durable"
        assert settings.log_level == "INFO"
        assert settings.metrics_public is False
        assert settings.idempotency_window == 86400.0
        assert settings.wal_segment_bytes == 64 * 1024 * 1024

    def test_default_drain_fits_inside_gunicorn_timeouts(self) -> None:
        """The default drain ends before gunicorn's SIGKILL (graceful_timeout) or SIGABRT (timeout)."""
        assert DEFAULT_DRAIN_TIMEOUT < GUNICORN_TIMEOUT

    def test_absolute_data_dir_gives_an_absolute_sqlite_path(self, tmp_path: Path) -> None:
        """NEXUS_DATA_DIR=/abs puts the default database at sqlite:////abs/nexus.db."""
        settings = load_settings({"NEXUS_DATA_DIR": str(tmp_path)})

        assert settings.destination("default").url == f"sqlite:///{tmp_path}/nexus.db"
        assert settings.destination("default").url.startswith("sqlite:////")

    def test_tokens_are_generated_and_their_files_listed(self, tmp_path: Path) -> None:
        """Without NEXUS_TOKEN/NEXUS_ADMIN_TOKEN both tokens are generated and their files listed."""
        data = tmp_path / "data"

        settings = load_settings({"NEXUS_DATA_DIR": str(data)})

        assert settings.generated_secrets == (
            data / "secrets" / "token-default",
            data / "secrets" / "admin-token",
        )
        assert settings.sources[0].token == (data / "secrets" / "token-default").read_text().strip()
        assert settings.admin_token == (data / "secrets" / "admin-token").read_text().strip()
        assert settings.admin_token != settings.sources[0].token


class TestEnvironment:
    def test_every_variable_is_read(self, tmp_path: Path) -> None:
        """Each NEXUS_* variable sets its setting."""
        environ = {
            "NEXUS_DATA_DIR": str(tmp_path),
            "NEXUS_DESTINATION_URL": "postgresql://nexus@db/nexus",
            "NEXUS_TOKEN": "source-token",
            "NEXUS_ADMIN_TOKEN": "admin-token",
            "NEXUS_QUEUE_SIZE": "123",
            "NEXUS_QUEUE_WORKERS": "7",
            "NEXUS_DELIVERY_LINGER": "0",
            "NEXUS_MAX_ATTEMPTS": "9",
            "NEXUS_INITIAL_BACKOFF": "0.25",
            "NEXUS_DRAIN_TIMEOUT": "5",
            "NEXUS_MAX_BODY_BYTES": "2048",
            "NEXUS_SHED_POLICY": "reject",
            "NEXUS_LOG_LEVEL": "debug",
            "NEXUS_METRICS_PUBLIC": "true",
            "NEXUS_IDEMPOTENCY_WINDOW": "60",
            "NEXUS_WAL_SEGMENT_BYTES": "4096",
        }

        settings = load_settings(environ)

        assert settings == Settings(
            data_dir=tmp_path,
            sources=(SourceSettings("default", "source-token", "default"),),
            destinations=(DestinationSettings("default", "postgresql://nexus@db/nexus"),),
            admin_token="admin-token",
            queue_size=123,
            queue_workers=7,
            delivery_linger=0.0,
            max_attempts=9,
            initial_backoff=0.25,
            drain_timeout=5.0,
            max_body_bytes=2048,
            shed_policy="reject",
            log_level="DEBUG",
            metrics_public=True,
            idempotency_window=60.0,
            wal_segment_bytes=4096,
            generated_secrets=(),
        )

    def test_given_tokens_generate_no_files(self, tmp_path: Path) -> None:
        """With both tokens in the environment no secret file is written."""
        load_settings({"NEXUS_DATA_DIR": str(tmp_path), "NEXUS_TOKEN": "a1", "NEXUS_ADMIN_TOKEN": "b2"})

        assert not (tmp_path / "secrets").exists()

    @pytest.mark.parametrize("value", ["0", "-5"])
    def test_non_positive_queue_size_and_workers_fall_back_to_defaults(self, tmp_path: Path, value: str) -> None:
        """A queue size or worker count of zero or less means the default (a queue must be bounded)."""
        settings = load_settings(
            {
                "NEXUS_DATA_DIR": str(tmp_path),
                "NEXUS_QUEUE_SIZE": value,
                "NEXUS_QUEUE_WORKERS": value,
            }
        )

        assert settings.queue_size == DEFAULT_QUEUE_SIZE
        assert settings.queue_workers == DEFAULT_QUEUE_WORKERS

    def test_empty_variable_counts_as_unset(self, tmp_path: Path) -> None:
        """NEXUS_QUEUE_SIZE= (as compose files pass it) leaves the default in place."""
        settings = load_settings({"NEXUS_DATA_DIR": str(tmp_path), "NEXUS_QUEUE_SIZE": "", "NEXUS_TOKEN": ""})

        assert settings.queue_size == DEFAULT_QUEUE_SIZE
        assert settings.generated_secrets[0] == tmp_path / "secrets" / "token-default"

    @pytest.mark.parametrize(
        ("value", "expected"),
        [("warn", "WARNING"), ("Error", "ERROR"), (" info ", "INFO"), ("CRITICAL", "CRITICAL")],
    )
    def test_log_level_is_case_insensitive_and_canonical(self, tmp_path: Path, value: str, expected: str) -> None:
        """NEXUS_LOG_LEVEL accepts any case and is stored as the canonical upper-case name."""
        settings = load_settings({"NEXUS_DATA_DIR": str(tmp_path), "NEXUS_LOG_LEVEL": value})

        assert settings.log_level == expected

    @pytest.mark.parametrize(
        ("value", "expected"),
        [("1", True), ("yes", True), ("ON", True), ("0", False), ("false", False), ("off", False)],
    )
    def test_metrics_public_accepts_the_usual_booleans(self, tmp_path: Path, value: str, expected: bool) -> None:
        """NEXUS_METRICS_PUBLIC takes 1/0, true/false, yes/no, on/off in any case."""
        settings = load_settings({"NEXUS_DATA_DIR": str(tmp_path), "NEXUS_METRICS_PUBLIC": value})

        assert settings.metrics_public is expected

    def test_shed_policy_is_case_insensitive(self, tmp_path: Path) -> None:
        """NEXUS_SHED_POLICY=REJECT selects the reject policy."""
        settings = load_settings({"NEXUS_DATA_DIR": str(tmp_path), "NEXUS_SHED_POLICY": "REJECT"})

        assert settings.shed_policy == "reject"


class TestToml:
    def test_several_sources_and_destinations(self, tmp_path: Path) -> None:
        """Sources and destinations come from [[sources]] and [[destinations]], in file order."""
        token_file = tmp_path / "crm-token"
        token_file.write_text("crm-secret\n")
        environ = _write_toml(
            tmp_path,
            f"""
            admin_token = "the-admin"

            [[destinations]]
            name = "warehouse"
            url = "postgresql://nexus@db/nexus"

            [[destinations]]
            name = "archive"
            url = "sqlite:///archive.db"

            [[sources]]
            name = "billing"
            token = "env:BILLING_TOKEN"
            destination = "warehouse"

            [[sources]]
            name = "crm"
            token = "file:{token_file}"
            destination = "archive"

            [[sources]]
            name = "web.v2"
            token = "literal-token"
            destination = "warehouse"
            """,
        )
        environ["BILLING_TOKEN"] = "billing-secret"

        settings = load_settings(environ)

        assert settings.sources == (
            SourceSettings("billing", "billing-secret", "warehouse"),
            SourceSettings("crm", "crm-secret", "archive"),
            SourceSettings("web.v2", "literal-token", "warehouse"),
        )
        assert settings.destinations == (
            DestinationSettings("warehouse", "postgresql://nexus@db/nexus"),
            DestinationSettings("archive", "sqlite:///archive.db"),
        )
        assert settings.admin_token == "the-admin"

    def test_environment_wins_over_toml(self, tmp_path: Path) -> None:
        """A value set both in the environment and in the file is taken from the environment."""
        environ = _write_toml(
            tmp_path,
            """
            queue_size = 100
            max_attempts = 3
            shed_policy = "reject"
            admin_token = "from-file"
            """,
        )
        environ |= {
            "NEXUS_QUEUE_SIZE": "200",
            "NEXUS_SHED_POLICY": "durable",
            "NEXUS_ADMIN_TOKEN": "from-env",
        }

        settings = load_settings(environ)

        assert settings.queue_size == 200
        assert settings.max_attempts == 3
        assert settings.shed_policy == "durable"
        assert settings.admin_token == "from-env"

    def test_toml_data_dir_is_used_when_the_environment_is_silent(self, tmp_path: Path) -> None:
        """data_dir in the file sets the data dir, and with it the default SQLite path."""
        path = tmp_path / "nexus.toml"
        path.write_text(f'data_dir = "{tmp_path / "from-file"}"\n')

        settings = load_settings({"NEXUS_CONFIG": str(path)})

        assert settings.data_dir == tmp_path / "from-file"
        assert settings.destination("default").url == f"sqlite:///{tmp_path}/from-file/nexus.db"

    def test_no_sources_in_toml_means_the_default_source(self, tmp_path: Path) -> None:
        """A file with only scalar settings still gets the default source and destination."""
        environ = _write_toml(tmp_path, 'token = "top-level-token"\nqueue_workers = 2\n')

        settings = load_settings(environ)

        assert settings.sources == (SourceSettings("default", "top-level-token", "default"),)
        assert settings.destination("default").url.endswith("/data/nexus.db")

    def test_nexus_token_wins_over_the_default_sources_toml_token(self, tmp_path: Path) -> None:
        """NEXUS_TOKEN replaces the token of a [[sources]] entry named 'default'."""
        environ = _write_toml(tmp_path, '[[sources]]\nname = "default"\ntoken = "from-file"\n')
        environ["NEXUS_TOKEN"] = "from-env"

        settings = load_settings(environ)

        assert settings.sources == (SourceSettings("default", "from-env", "default"),)

    def test_destination_url_variable_overrides_a_declared_default(self, tmp_path: Path) -> None:
        """NEXUS_DESTINATION_URL replaces the URL of a [[destinations]] entry named 'default'."""
        environ = _write_toml(tmp_path, '[[destinations]]\nname = "default"\nurl = "sqlite:///file.db"\n')
        environ["NEXUS_DESTINATION_URL"] = "postgresql://env@db/nexus"

        settings = load_settings(environ)

        assert settings.destinations == (DestinationSettings("default", "postgresql://env@db/nexus"),)

    def test_source_without_destination_writes_to_the_default_one(self, tmp_path: Path) -> None:
        """A source that names no destination uses 'default', which is then created implicitly."""
        environ = _write_toml(tmp_path, '[[sources]]\nname = "app"\ntoken = "app-token"\n')

        settings = load_settings(environ)

        assert settings.sources == (SourceSettings("app", "app-token", "default"),)
        assert [d.name for d in settings.destinations] == ["default"]

    def test_unused_default_destination_is_left_out(self, tmp_path: Path) -> None:
        """When no source writes to 'default', no such destination (and no SQLite file) exists."""
        environ = _write_toml(
            tmp_path,
            """
            [[destinations]]
            name = "pg"
            url = "postgres://nexus@db/nexus"

            [[sources]]
            name = "app"
            token = "app-token"
            destination = "pg"
            """,
        )

        settings = load_settings(environ)

        assert [d.name for d in settings.destinations] == ["pg"]

    def test_source_without_token_gets_a_generated_one(self, tmp_path: Path) -> None:
        """A [[sources]] entry without a token gets one generated in secrets/token-<name>."""
        environ = _write_toml(tmp_path, '[[sources]]\nname = "app"\n')

        settings = load_settings(environ)

        path = tmp_path / "data" / "secrets" / "token-app"
        assert path in settings.generated_secrets
        assert settings.sources[0].token == path.read_text().strip()

    def test_token_file_without_trailing_newline_is_read_as_is(self, tmp_path: Path) -> None:
        """file:PATH strips a trailing newline only, and works without one."""
        (tmp_path / "t").write_text("no-newline")
        environ = _write_toml(tmp_path, f'[[sources]]\nname = "a"\ntoken = "file:{tmp_path}/t"\n')

        assert load_settings(environ).sources[0].token == "no-newline"


class TestValidation:
    @pytest.mark.parametrize(
        ("environ", "message"),
        [
            ({"NEXUS_QUEUE_SIZE": "ten"}, "NEXUS_QUEUE_SIZE must be an integer"),
            ({"NEXUS_QUEUE_WORKERS": "2.5"}, "NEXUS_QUEUE_WORKERS must be an integer"),
            ({"NEXUS_MAX_ATTEMPTS": "x"}, "NEXUS_MAX_ATTEMPTS must be an integer"),
            ({"NEXUS_MAX_ATTEMPTS": "0"}, "NEXUS_MAX_ATTEMPTS must be at least 1"),
            ({"NEXUS_MAX_BODY_BYTES": "-1"}, "NEXUS_MAX_BODY_BYTES must be at least 1"),
            ({"NEXUS_MAX_BODY_BYTES": "1MB"}, "NEXUS_MAX_BODY_BYTES must be an integer"),
            ({"NEXUS_QUEUE_SIZE": "\uff11\uff10"}, "NEXUS_QUEUE_SIZE must be an integer"),
            ({"NEXUS_BODY_TIMEOUT": "\u0663"}, "NEXUS_BODY_TIMEOUT must be a number"),
            ({"NEXUS_WAL_SEGMENT_BYTES": "0"}, "NEXUS_WAL_SEGMENT_BYTES must be at least 1"),
            ({"NEXUS_INITIAL_BACKOFF": "soon"}, "NEXUS_INITIAL_BACKOFF must be a number"),
            ({"NEXUS_INITIAL_BACKOFF": "-1"}, "NEXUS_INITIAL_BACKOFF must not be negative"),
            ({"NEXUS_DRAIN_TIMEOUT": "inf"}, "NEXUS_DRAIN_TIMEOUT must be a number"),
            ({"NEXUS_DELIVERY_LINGER": "-0.1"}, "NEXUS_DELIVERY_LINGER must not be negative"),
            ({"NEXUS_DELIVERY_LINGER": "11"}, "NEXUS_DELIVERY_LINGER must be at most 10 seconds"),
            ({"NEXUS_IDEMPOTENCY_WINDOW": "nan"}, "NEXUS_IDEMPOTENCY_WINDOW must be a number"),
            ({"NEXUS_SHED_POLICY": "drop"}, "NEXUS_SHED_POLICY must be 'durable' or 'reject'"),
            ({"NEXUS_LOG_LEVEL": "verbose"}, "NEXUS_LOG_LEVEL: unknown log level"),
            ({"NEXUS_METRICS_PUBLIC": "maybe"}, "NEXUS_METRICS_PUBLIC must be true or false"),
            ({"NEXUS_DESTINATION_URL": "mysql://db"}, "NEXUS_DESTINATION_URL must be sqlite"),
            ({"NEXUS_DESTINATION_URL": "sqlite:///"}, "NEXUS_DESTINATION_URL must be sqlite"),
            ({"NEXUS_TOKEN": "has space"}, "NEXUS_TOKEN must be visible ASCII"),
            ({"NEXUS_ADMIN_TOKEN": "tab\there"}, "NEXUS_ADMIN_TOKEN must be visible ASCII"),
            ({"NEXUS_TOKEN": "same", "NEXUS_ADMIN_TOKEN": "same"}, "admin token is also"),
            ({"NEXUS_CONFIG": "/nonexistent/nexus.toml"}, "NEXUS_CONFIG: cannot read"),
        ],
    )
    def test_invalid_environment_is_refused_naming_the_variable(
        self, tmp_path: Path, environ: dict[str, str], message: str
    ) -> None:
        """An invalid variable raises ConfigError whose message names the variable and the fault."""
        with pytest.raises(ConfigError, match=message):
            load_settings({"NEXUS_DATA_DIR": str(tmp_path / "data"), **environ})

    @pytest.mark.parametrize(
        ("toml", "message"),
        [
            ("queue_size = 1.5", "queue_size in .* must be an integer"),
            ("queue_size = true", "queue_size in .* must be an integer"),
            ('max_body_bytes = "-10"', "max_body_bytes in .* must be at least 1"),
            ("max_body_bytes = -10", "max_body_bytes in .* must be at least 1"),
            ('shed_policy = "sometimes"', "shed_policy in .* must be 'durable' or 'reject'"),
            ("metrics_public = 2", "metrics_public in .* must be true or false"),
            ("log_level = 10", "log_level in .* must be a level name"),
            ("queue_sise = 10", "unknown setting.* queue_sise"),
            ('sources = "billing"', r"must be an array of tables \(\[\[sources\]\]\)"),
            ('[[sources]]\nname = "a"\ntokn = "x"', "unknown key.* tokn in \\[\\[sources\\]\\]"),
            ('[[sources]]\ntoken = "x"', "needs a name"),
            (
                '[[sources]]\nname = "a"\ntoken = "x"\ndestination = "nowhere"',
                "source 'a' .* names an unknown destination 'nowhere'",
            ),
            (
                '[[sources]]\nname = "a"\ntoken = "x"\n[[sources]]\nname = "a"\ntoken = "y"',
                "source 'a' is declared twice",
            ),
            (
                (
                    '[[destinations]]\nname = "d"\nurl = "sqlite:///a.db"\n'
                    '[[destinations]]\nname = "d"\nurl = "sqlite:///b.db"'
                ),
                "destination 'd' is declared twice",
            ),
            (
                (
                    '[[destinations]]\nname = "d"\nurl = "postgresql://u:hunter2@db/x"\n'
                    '[[destinations]]\nname = "e"\nurl = "http://u:hunter2@db/x"'
                ),
                "url of destination 'e' .* must be sqlite:///PATH or postgresql://",
            ),
            ('[[sources]]\nname = "a"\ntoken = ""', "token of source 'a' .* is empty"),
            ('[[sources]]\nname = "a"\ntoken = 42', "token of source 'a' .* must be a string"),
            (
                '[[sources]]\nname = "a"\ntoken = "env:UNSET_VAR"',
                r"token of source 'a' .* refers to \$UNSET_VAR, which is not set",
            ),
            (
                '[[sources]]\nname = "a"\ntoken = "env:EMPTY_VAR"',
                r"token of source 'a' .* \(from \$EMPTY_VAR\) is empty",
            ),
            (
                '[[sources]]\nname = "a"\ntoken = "file:/nonexistent/token"',
                "token of source 'a' .* cannot read the token file /nonexistent/token",
            ),
            (
                '[[sources]]\nname = "a"\ntoken = "t1"\n[[sources]]\nname = "b"\ntoken = "t1"',
                "sources 'a' and 'b' have the same token",
            ),
            ('admin_token = "env:EMPTY_VAR"', r"admin_token in .* \(from \$EMPTY_VAR\) is empty"),
            (
                'token = "t"\n[[sources]]\nname = "a"\ntoken = "x"',
                "token in .* is the token of the implicit source 'default'",
            ),
            (
                ('destination_url = "sqlite:///a.db"\n[[destinations]]\nname = "default"\nurl = "sqlite:///b.db"'),
                "sets the URL of destination 'default' twice",
            ),
            ("this is = not toml", "is not valid TOML"),
        ],
    )
    def test_invalid_toml_is_refused_naming_the_setting(self, tmp_path: Path, toml: str, message: str) -> None:
        """An invalid file raises ConfigError whose message names the setting and the fault."""
        environ = _write_toml(tmp_path, toml) | {"EMPTY_VAR": ""}

        with pytest.raises(ConfigError, match=message):
            load_settings(environ)

    def test_non_string_data_dir_in_toml_is_refused(self, tmp_path: Path) -> None:
        """data_dir in the file must be a path string."""
        path = tmp_path / "nexus.toml"
        path.write_text("data_dir = 5\n")

        with pytest.raises(ConfigError, match=r"data_dir in .* must be a non-empty string"):
            load_settings({"NEXUS_CONFIG": str(path)})

    @pytest.mark.parametrize("name", ["", "has space", "a/b", "x" * 65, "..", "ünïcode", "semi;colon"])
    def test_bad_source_names_are_refused(self, tmp_path: Path, name: str) -> None:
        """A source name must be 1-64 of A-Z a-z 0-9 _ . - (it appears in URLs and file names)."""
        environ = _write_toml(tmp_path, f'[[sources]]\nname = "{name}"\ntoken = "t"\n')

        with pytest.raises(ConfigError, match=r"sources name .* use 1-64 characters"):
            load_settings(environ)

    @pytest.mark.parametrize("name", ["a", "A-Z_0.9", "x" * 64])
    def test_good_source_names_are_accepted(self, tmp_path: Path, name: str) -> None:
        """Names at the edges of the allowed alphabet and length are accepted."""
        environ = _write_toml(tmp_path, f'[[sources]]\nname = "{name}"\ntoken = "t"\n')

        assert load_settings(environ).sources[0].name == name

    def test_url_with_a_password_is_not_echoed(self, tmp_path: Path) -> None:
        """A refused destination URL does not appear in the error, since it may hold a password."""
        with pytest.raises(ConfigError) as caught:
            load_settings({"NEXUS_DATA_DIR": str(tmp_path), "NEXUS_DESTINATION_URL": "pg://u:hunter2@db"})

        assert "hunter2" not in str(caught.value)

    def test_invalid_configuration_leaves_no_trace(self, tmp_path: Path) -> None:
        """A refused configuration creates neither the data dir nor any secret."""
        data = tmp_path / "data"

        with pytest.raises(ConfigError):
            load_settings({"NEXUS_DATA_DIR": str(data), "NEXUS_SHED_POLICY": "drop"})

        assert not data.exists()

    def test_empty_secret_file_is_refused(self, tmp_path: Path) -> None:
        """A secret file emptied by hand is an error naming the file, not an empty token."""
        (tmp_path / "secrets").mkdir()
        (tmp_path / "secrets" / "admin-token").write_text("")

        with pytest.raises(ConfigError, match="admin-token is empty"):
            load_settings({"NEXUS_DATA_DIR": str(tmp_path), "NEXUS_TOKEN": "t"})


class TestGeneratedSecrets:
    def test_secret_files_are_0600_in_a_0700_directory(self, tmp_path: Path) -> None:
        """Generated token files are owner-only, as are the secrets dir and a new data dir."""
        data = tmp_path / "data"

        settings = load_settings({"NEXUS_DATA_DIR": str(data)})

        assert _mode(data) == 0o700
        assert _mode(data / "secrets") == 0o700
        assert [_mode(path) for path in settings.generated_secrets] == [0o600, 0o600]

    def test_existing_data_dir_keeps_its_mode(self, tmp_path: Path) -> None:
        """A data dir the operator created is not chmod-ed."""
        data = tmp_path / "data"
        data.mkdir(mode=0o750)
        data.chmod(0o750)

        load_settings({"NEXUS_DATA_DIR": str(data)})

        assert _mode(data) == 0o750

    def test_generated_tokens_are_reused_by_the_next_load(self, tmp_path: Path) -> None:
        """A restart reads the tokens generated by the first start instead of making new ones."""
        environ = {"NEXUS_DATA_DIR": str(tmp_path)}
        first = load_settings(environ)

        second = load_settings(environ)

        assert second.sources == first.sources
        assert second.admin_token == first.admin_token
        assert second.generated_secrets == first.generated_secrets

    def test_workers_loading_at_once_share_the_tokens(self, tmp_path: Path) -> None:
        """Several gunicorn workers starting together end up with the same generated tokens."""
        # Given: processes that load the settings at the same moment, with no secrets yet
        environ = {"NEXUS_DATA_DIR": str(tmp_path / "data")}
        ctx = multiprocessing.get_context("fork")
        workers = 6
        barrier = ctx.Barrier(workers)
        results: ProcessQueue[tuple[str, str]] = ctx.Queue()
        procs = [ctx.Process(target=_load_in_process, args=(environ, barrier, results)) for _ in range(workers)]
        # When
        for proc in procs:
            proc.start()
        outcomes = [results.get(timeout=30) for _ in procs]
        for proc in procs:
            proc.join(timeout=30)
        # Then: one pair of tokens, and it is the pair on disk
        assert len(set(outcomes)) == 1
        assert outcomes[0] == (
            (tmp_path / "data" / "secrets" / "token-default").read_text().strip(),
            (tmp_path / "data" / "secrets" / "admin-token").read_text().strip(),
        )


class TestSettingsLookups:
    def _settings(self, tmp_path: Path) -> Settings:
        environ = _write_toml(
            tmp_path,
            """
            [[destinations]]
            name = "pg"
            url = "postgresql://nexus:hunter2@db/nexus"

            [[sources]]
            name = "app"
            token = "app-secret-token"
            destination = "pg"
            """,
        )
        environ["NEXUS_ADMIN_TOKEN"] = "admin-secret-token"
        return load_settings(environ)

    def test_source_finds_a_source_by_name(self, tmp_path: Path) -> None:
        """source(name) returns the named source, or None for an unknown name."""
        settings = self._settings(tmp_path)

        assert settings.source("app") == SourceSettings("app", "app-secret-token", "pg")
        assert settings.source("default") is None

    def test_destination_finds_a_destination_by_name(self, tmp_path: Path) -> None:
        """destination(name) returns the named destination and raises KeyError for others."""
        settings = self._settings(tmp_path)

        assert settings.destination("pg").url == "postgresql://nexus:hunter2@db/nexus"
        with pytest.raises(KeyError):
            settings.destination("default")

    def test_repr_hides_tokens_and_passwords(self, tmp_path: Path) -> None:
        """Printing or logging Settings shows no token and no database password."""
        text = repr(self._settings(tmp_path))

        assert "secret-token" not in text
        assert "hunter2" not in text
        assert "postgresql://nexus:***@db/nexus" in text


def _limits(settings: Settings) -> dict[str, tuple[float | None, int | None]]:
    return {s.name: (s.rate_limit_per_second, s.rate_limit_burst) for s in settings.sources}


class TestRateLimits:
    """rate_limit_per_second / rate_limit_burst: per [[sources]] table, NEXUS_RATE_LIMIT_* for 'default'."""

    def test_no_rate_means_no_limit(self, tmp_path: Path) -> None:
        """Without any rate-limit setting every source is unlimited (both values None)."""
        settings = load_settings({"NEXUS_DATA_DIR": str(tmp_path)})
        assert _limits(settings) == {"default": (None, None)}

    def test_the_environment_limits_the_default_source(self, tmp_path: Path) -> None:
        """NEXUS_RATE_LIMIT_PER_SECOND and NEXUS_RATE_LIMIT_BURST set the default source's bucket."""
        env = {"NEXUS_DATA_DIR": str(tmp_path), "NEXUS_RATE_LIMIT_PER_SECOND": "2.5", "NEXUS_RATE_LIMIT_BURST": "40"}
        assert _limits(load_settings(env)) == {"default": (2.5, 40)}

    @pytest.mark.parametrize(("rate", "burst"), [("0.2", 1), ("1", 1), ("2.5", 3), ("100", 100)])
    def test_a_rate_without_a_burst_has_a_burst_of_one_seconds_worth(
        self, tmp_path: Path, rate: str, burst: int
    ) -> None:
        """A rate alone gets a burst of max(1, ceil(rate))."""
        env = {"NEXUS_DATA_DIR": str(tmp_path), "NEXUS_RATE_LIMIT_PER_SECOND": rate}
        assert _limits(load_settings(env)) == {"default": (float(rate), burst)}

    def test_top_level_keys_limit_the_implicit_default_source(self, tmp_path: Path) -> None:
        """Without [[sources]], the top-level TOML keys are the default source's limit; the environment wins."""
        environ = _write_toml(tmp_path, "rate_limit_per_second = 7\nrate_limit_burst = 9\n")
        assert _limits(load_settings(environ)) == {"default": (7.0, 9)}
        environ["NEXUS_RATE_LIMIT_BURST"] = "12"
        assert _limits(load_settings(environ)) == {"default": (7.0, 12)}

    def test_each_source_table_has_its_own_limit(self, tmp_path: Path) -> None:
        """[[sources]] tables carry their own keys; a table without them is unlimited."""
        environ = _write_toml(
            tmp_path,
            """
            [[sources]]
            name = "noisy"
            token = "noisy-token"
            rate_limit_per_second = 0.5
            rate_limit_burst = 2

            [[sources]]
            name = "quiet"
            token = "quiet-token"

            [[sources]]
            name = "rated"
            token = "rated-token"
            rate_limit_per_second = 20
            """,
        )
        assert _limits(load_settings(environ)) == {"noisy": (0.5, 2), "quiet": (None, None), "rated": (20.0, 20)}

    def test_the_environment_wins_over_the_default_sources_table(self, tmp_path: Path) -> None:
        """NEXUS_RATE_LIMIT_* replace the keys of a [[sources]] entry named 'default', key by key."""
        environ = _write_toml(
            tmp_path, '[[sources]]\nname = "default"\nrate_limit_per_second = 1\nrate_limit_burst = 5\n'
        )
        environ["NEXUS_RATE_LIMIT_PER_SECOND"] = "3"
        assert _limits(load_settings(environ)) == {"default": (3.0, 5)}

    @pytest.mark.parametrize(
        ("env", "message"),
        [
            ({"NEXUS_RATE_LIMIT_PER_SECOND": "0"}, "NEXUS_RATE_LIMIT_PER_SECOND must be greater than 0, got 0"),
            ({"NEXUS_RATE_LIMIT_PER_SECOND": "-1"}, "NEXUS_RATE_LIMIT_PER_SECOND must be greater than 0"),
            ({"NEXUS_RATE_LIMIT_PER_SECOND": "fast"}, "NEXUS_RATE_LIMIT_PER_SECOND must be a number, got 'fast'"),
            ({"NEXUS_RATE_LIMIT_PER_SECOND": "inf"}, "NEXUS_RATE_LIMIT_PER_SECOND must be a number"),
            ({"NEXUS_RATE_LIMIT_PER_SECOND": "nan"}, "NEXUS_RATE_LIMIT_PER_SECOND must be a number"),
            (
                {"NEXUS_RATE_LIMIT_PER_SECOND": "1", "NEXUS_RATE_LIMIT_BURST": "0"},
                "NEXUS_RATE_LIMIT_BURST must be at least 1, got 0",
            ),
            (
                {"NEXUS_RATE_LIMIT_PER_SECOND": "1", "NEXUS_RATE_LIMIT_BURST": "1.5"},
                "NEXUS_RATE_LIMIT_BURST must be an integer, got '1.5'",
            ),
            ({"NEXUS_RATE_LIMIT_BURST": "10"}, "NEXUS_RATE_LIMIT_BURST needs a rate: set rate_limit_per_second"),
        ],
    )
    def test_invalid_environment_values_are_refused_naming_the_variable(
        self, tmp_path: Path, env: dict[str, str], message: str
    ) -> None:
        """A rate that is not a positive number, a burst under 1 or without a rate: ConfigError naming it."""
        with pytest.raises(ConfigError, match=message):
            load_settings({"NEXUS_DATA_DIR": str(tmp_path), **env})

    @pytest.mark.parametrize(
        ("toml", "message"),
        [
            (
                '[[sources]]\nname = "a"\nrate_limit_per_second = true',
                "rate_limit_per_second of source 'a' in .* must be a number, got True",
            ),
            (
                '[[sources]]\nname = "a"\nrate_limit_per_second = 0.0',
                "rate_limit_per_second of source 'a' in .* must be greater than 0",
            ),
            (
                '[[sources]]\nname = "a"\nrate_limit_per_second = 1\nrate_limit_burst = 0',
                "rate_limit_burst of source 'a' in .* must be at least 1",
            ),
            (
                '[[sources]]\nname = "a"\nrate_limit_burst = 3',
                "rate_limit_burst of source 'a' in .* needs a rate",
            ),
            ("rate_limit_per_second = nan", "rate_limit_per_second in .* must be a number"),
            (
                'rate_limit_per_second = 1\n[[sources]]\nname = "a"',
                "rate_limit_per_second in .* is the rate_limit_per_second of the implicit source 'default'",
            ),
        ],
    )
    def test_invalid_toml_values_are_refused_naming_the_setting(self, tmp_path: Path, toml: str, message: str) -> None:
        """Invalid rate-limit keys in the file: ConfigError naming the key and its source."""
        with pytest.raises(ConfigError, match=message):
            load_settings(_write_toml(tmp_path, toml))

    def test_an_environment_limit_for_an_undeclared_default_source_is_refused(self, tmp_path: Path) -> None:
        """NEXUS_RATE_LIMIT_* when [[sources]] has no 'default': refused, rather than a limit on nothing."""
        environ = _write_toml(tmp_path, '[[sources]]\nname = "a"\n')
        environ["NEXUS_RATE_LIMIT_PER_SECOND"] = "5"
        with pytest.raises(ConfigError, match="NEXUS_RATE_LIMIT_PER_SECOND is a setting of source 'default'"):
            load_settings(environ)
