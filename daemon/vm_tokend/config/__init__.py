"""config: the daemon's settings — the only code that reads the environment and files.

    settings.py     Settings and its sources (flags > environment > credentials directory >
                    TOML), the profiles built from them, ConfigError
    profile.py      one profile's settings and its host rules
    passwords.py    PasswordSource: a username and where its password comes from (given,
                    a file, a command), read when a login needs it
    environment.py  the process environment, handed to whoever needs it
    flags.py        command-line flags that several commands share
"""
