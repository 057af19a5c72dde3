"""A real OAuth 2.1 authorization server (django-oauth-toolkit) for the test suite, run in its own
process by ``tests/oauth_dot.py``: it has its own Django settings and database, which the test
process (configured for TwinMCP) cannot host."""
