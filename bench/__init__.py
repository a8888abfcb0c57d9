"""Benchmarks of nexus_gevent, driven from this machine over loopback."""
