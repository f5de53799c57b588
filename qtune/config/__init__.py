from qtune.config.compose import CONF_DIR, compose, multirun, to_object

__all__ = ["CONF_DIR", "compose", "multirun", "to_object"]
