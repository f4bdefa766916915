"""Settings: both roles' flags and their validation (`options`), config files under them (`files`), and the leader's
settings that cannot work together (`checks`)."""
