"""The control plane (SPEC §7): the admin HTTP API with token roles, ``explain``, and the
``access-proxy admin`` CLI that talks to the API over HTTP."""
