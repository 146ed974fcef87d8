"""config: the daemon's settings — the only code that reads the environment and files.

    settings.py   Settings and its sources (flags > environment > credentials directory >
                  TOML), the profiles built from them, ConfigError
    profile.py    one profile's settings and its host rules
"""
