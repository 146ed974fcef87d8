"""server: the client side of the daemon — everything here faces a hostile local client.

    connections.py  the Unix socket, the peer check, framing, limits and deadlines
    dispatch.py     one request map in, one reply map out, for every op
    login_ops.py    the interactive-login ops

It asks the keeper and never talks to the API itself.
"""
