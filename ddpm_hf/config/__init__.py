"""Settings: the flags and YAML keys of the commands, their defaults, help and checks."""
