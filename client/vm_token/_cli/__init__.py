"""The `vm-token` command beyond the entry point (`vm_token.cli`, the fast path).

    shared.py    exit codes, one-line errors, one request: the leaf every part shares
    git.py       git's credential-helper operations, on the fast path
    commands.py  the full argparse front end: every subcommand, --help
    login.py     browser and device logins: the loopback listener, the browser
    parser.py    an ArgumentParser whose usage errors are one line
"""
