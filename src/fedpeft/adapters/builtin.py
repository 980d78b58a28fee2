"""Import every shipped adapter module once so that each registers itself."""

import fedpeft.adapters.abmll  # noqa: F401
import fedpeft.adapters.ffa_lora_hetero  # noqa: F401
import fedpeft.adapters.icm_lora  # noqa: F401
import fedpeft.adapters.meteora  # noqa: F401
import fedpeft.adapters.mtlora  # noqa: F401
import fedpeft.adapters.nola  # noqa: F401
import fedpeft.adapters.osft  # noqa: F401
import fedpeft.adapters.sara  # noqa: F401
import fedpeft.adapters.smora  # noqa: F401
import fedpeft.adapters.soka  # noqa: F401
import fedpeft.adapters.texforce  # noqa: F401
import fedpeft.adapters.triadapt_lora  # noqa: F401
from fedpeft.adapters import ffa_lora, lora  # noqa: F401
