"""Import every shipped adapter module once so that each registers itself."""

import adapters.abmll  # noqa: F401
import adapters.ffa_lora_hetero  # noqa: F401
import adapters.icm_lora  # noqa: F401
import adapters.meteora  # noqa: F401
import adapters.mtlora  # noqa: F401
import adapters.nola  # noqa: F401
import adapters.osft  # noqa: F401
import adapters.sara  # noqa: F401
import adapters.smora  # noqa: F401
import adapters.soka  # noqa: F401
import adapters.texforce  # noqa: F401
import adapters.triadapt_lora  # noqa: F401
from adapters import ffa_lora, lora  # noqa: F401
