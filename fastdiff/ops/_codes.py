"""Integer codes of the schemas' string options (mirrors csrc/common.h)."""
PREDICTION = ("epsilon", "sample", "v_prediction")
VARIANCE = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


def code(value: str, choices: tuple, name: str) -> int:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return choices.index(value)
