"""Surviving mutants of ``make mutation`` that no test can tell apart, with the reason.

Keys are mutmut's mutant names (``module.x_function__mutmut_N``; the numbering is stable while
the function's source is unchanged). A survivor not listed here is shown as needing a test in
``benchmarks/results/mutation.md``.
"""

from __future__ import annotations

EQUIVALENT: dict[str, str] = {
    # --- strategies.adapter_avg ---
    "fedpeft.strategies.adapter_avg.x__client_order__mutmut_5":
        "(2, name) instead of (1, name): only the order of the tags matters, and numeric ids (0) still sort "
        "before names (2); every name keeps its place among names, so the sort is the same for every input.",
    "fedpeft.strategies.adapter_avg.xǁAdapterAvgǁload_state_dict__mutmut_21":
        "np.array(v) without copy=: numpy's default is copy=True, the same call.",
    "fedpeft.strategies.adapter_avg.xǁAdapterAvgǁstate_dict__mutmut_6":
        "np.array(v) without copy=: numpy's default is copy=True, the same call.",
    # --- privacy.randomness ---
    "fedpeft.privacy.randomness.xǁNodeSecretǁgenerate__mutmut_2": ("`secrets.token_bytes(None)` draws `secrets.DEFAULT_ENTROPY` = 32 bytes, exactly the 32 the code asks for: the same distribution of keys, so no test can tell them apart."),
    "fedpeft.privacy.randomness.xǁNodeSecretǁload_or_create__mutmut_14": ("`secrets.token_bytes(None)` draws `secrets.DEFAULT_ENTROPY` = 32 bytes, exactly the 32 the code asks for: the same distribution of keys, so no test can tell them apart."),
    "fedpeft.privacy.randomness.xǁRoundRandomnessǁfresh_keys__mutmut_9": ("`secrets.token_bytes(None)` draws `secrets.DEFAULT_ENTROPY` = 32 bytes, exactly the 32 the code asks for: the same distribution of keys, so no test can tell them apart."),
    "fedpeft.privacy.randomness.xǁRoundRandomnessǁfresh_keys__mutmut_11": ("`secrets.token_bytes(None)` draws `secrets.DEFAULT_ENTROPY` = 32 bytes, exactly the 32 the code asks for: the same distribution of keys, so no test can tell them apart."),
    "fedpeft.privacy.randomness.xǁRoundRandomnessǁderived__mutmut_6": (
        "Drops `byteorder=\"big\"` from `int.from_bytes`, whose default is \"big\" since Python 3.11 "
        "(pyproject: requires-python >= 3.11): the same dropout seed."),
    "fedpeft.privacy.randomness.xǁChaChaStreamǁ__init____mutmut_4": (
        "Error-message wording only (\"XX...XX\"): the refusal of a key that is not 32 bytes is tested "
        "(test_stream_is_the_chacha20_keystream_with_a_zero_nonce)."),
    "fedpeft.privacy.randomness.xǁChaChaStreamǁ__init____mutmut_5": (
        "Error-message wording only (\"chacha20\" lower-cased); the refusal itself is tested."),
    "fedpeft.privacy.randomness.xǁChaChaStreamǁuniform__mutmut_11": (
        "`.astype(None)` is numpy's default dtype, float64: the same array as `.astype(np.float64)`."),
    # --- privacy.releases ---
    "fedpeft.privacy.releases.x_clipped_noisy_mean__mutmut_31": (
        "`sigma >= 0` instead of `sigma > 0`: at sigma = 0 the added term is `randn * 0` = +-0, which leaves "
        "every entry of the sum unchanged (the default generator it then seeds is never seen)."),
    "fedpeft.privacy.releases.x_clipped_noisy_mean__mutmut_37": (
        "The default generator is seeded with 64 instead of 63 secret bits: torch.Generator.manual_seed "
        "accepts both, and either seed is unknown to the server; the noise has the same distribution."),
    "fedpeft.privacy.releases.x_record_release__mutmut_46": (
        "The new entry's placeholder epsilon_after 0.0 becomes None; the next statement overwrites it with "
        "ledger.epsilon() (which reads only sigma, q and steps) before anything reads or saves it."),
    "fedpeft.privacy.releases.x_record_release__mutmut_60": (
        "The placeholder epsilon_after 0.0 becomes 1.0: overwritten by ledger.epsilon() on the next line, as in "
        "mutant 46."),
}

KILLED_SINCE: dict[str, str] = {
    # survived the run; the test named was added after it and fails with the mutant applied by
    # hand (not yet retested by mutmut: `python -m benchmarks.mutation --modules M --rerun-survivors`)
    "fedpeft.privacy.plan.x_make_plan__mutmut_5": "tests/test_privacy_plan.py::test_one_round_of_one_step_is_a_valid_plan",
}
