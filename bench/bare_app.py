"""The ceiling: a bare Falcon app that parses the same JSON body and answers 202.

Run under the same gunicorn settings as the service, it measures what
gunicorn + gevent + Falcon can serve at all on this machine.
"""

import falcon
import orjson


class _Inbound:
    def on_post(self, req: falcon.Request, resp: falcon.Response, source: str) -> None:
        body = req.bounded_stream.read()
        if not isinstance(orjson.loads(body), dict):
            raise falcon.HTTPBadRequest()
        resp.status = falcon.HTTP_202
        resp.content_type = falcon.MEDIA_JSON
        resp.data = b'{"payload_id":"00000000000000000000000000000000","status":"accepted"}'


app = falcon.App()
app.add_route("/inbound/{source}", _Inbound())
