"""The `vm-token` command beyond its fast path (`vm_token.cli`): argparse, help, login."""
