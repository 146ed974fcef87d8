"""server: the client side of the daemon — everything here faces a hostile local client.

    listener.py     the Unix socket: private directory, mode 0600, SO_PEERCRED
    connections.py  Server: the peer check, framing, limits and deadlines, per connection
    dispatch.py     one request map in, one reply map out, for every op
    login_ops.py    the interactive-login ops
    routing.py      which profile a request is for (by name, git's host, prefer_host)

It asks the keeper and never talks to the API itself.
"""
