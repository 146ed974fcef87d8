"""proxy: `vm-tokend proxy`, HTTP/1.1 for any program, the token added on the way to the API.

A separate process and a client of the daemon like any other (vm_token.AsyncClient): a
fault here never touches the tokens.

    http11.py    one client connection spoken with h11: events, deadlines, own answers
    routes.py    where a request may go: the API root, hop-by-hop headers, the VideoManager
    forward.py   the request to the API with the token, streaming; one replay after a 401
    service.py   ProxyServer: the listener, the peer check, Host -> profile, logging
    command.py   the `vm-tokend proxy` command
"""
