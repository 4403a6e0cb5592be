"""Input resolutions: multiples of the 14-pixel patch, 448..1344."""

from __future__ import annotations

from sam3stream.errors import ResolutionError

__all__ = ["MAX_RESOLUTION", "MIN_RESOLUTION", "PATCH", "check_resolution", "nearest_valid", "patch_grid"]

PATCH = 14
MIN_RESOLUTION = 448
MAX_RESOLUTION = 1344


def nearest_valid(value: int) -> list[int]:
    """The valid resolutions closest to ``value`` (one or two of them)."""
    clamped = min(max(value, MIN_RESOLUTION), MAX_RESOLUTION)
    below = clamped // PATCH * PATCH
    above = below if below == clamped else below + PATCH
    candidates = {
        min(max(below, MIN_RESOLUTION), MAX_RESOLUTION),
        min(max(above, MIN_RESOLUTION), MAX_RESOLUTION),
    }
    return sorted(candidates)


def check_resolution(value: object, key: str = "resolution") -> int:
    """Return ``value`` if it is a valid resolution, else raise naming it and its nearest valid ones."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ResolutionError(f"{key}: expected an integer, got {value!r}")
    if value % PATCH == 0 and MIN_RESOLUTION <= value <= MAX_RESOLUTION:
        return value
    near = " or ".join(str(v) for v in nearest_valid(value))
    raise ResolutionError(
        f"{key}: {value} is not a valid input resolution; it must be a multiple of {PATCH} "
        f"between {MIN_RESOLUTION} and {MAX_RESOLUTION} (nearest valid: {near})"
    )


def patch_grid(resolution: int) -> int:
    """Patches per side for a valid resolution (1008 -> 72)."""
    return check_resolution(resolution) // PATCH
