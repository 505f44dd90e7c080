"""The data plane: the request handler, forwarding, admission checks and safety flags."""
