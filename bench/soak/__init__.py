"""`make soak`: the real `vm-tokend` and `vm-tokend proxy` against two stand-in APIs (the
legacy login and OpenID Connect, one profile each) with faults switched on and off at
random, while 30 clients ask for tokens and call the API the ways users do. What the
simulated month (tests/simulation.py) checks inside the keeper, this checks from outside,
on real processes, sockets and HTTP, for SOAK_MINUTES (10).

    world.py    the stand-ins, the daemon and proxy processes, the resources sampled
    clients.py  `vm-token token`, the library, git's helper, curl and Node via the proxy
    faults.py   the faults, on the stand-ins' fault and rewrite hooks
    ledger.py   what happened, and the invariants judged as it runs
    checks.py   the invariants judged at the end, from the stand-ins' request logs
    report.py   the summary table
"""
