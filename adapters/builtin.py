"""Import every shipped adapter module once so that each registers itself."""

from adapters import ffa_lora, lora  # noqa: F401
