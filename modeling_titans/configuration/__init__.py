from .configuration_titans import TitansConfig

__all__ = ["TitansConfig"]
