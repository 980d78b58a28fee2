"""ICM-LoRA (Shao et al., IJCAI 2025) as one package, imported one way only:

* :mod:`~fedpeft.adapters.icm_lora.layers` -- the per-task LoRA layer, the task-vector holder
  and the feature helpers both halves use;
* :mod:`~fedpeft.adapters.icm_lora.options` -- the typed options;
* :mod:`~fedpeft.adapters.icm_lora.cvae` -- the small conditional VAE (no fedpeft imports);
* :mod:`~fedpeft.adapters.icm_lora.server` -- the server's pairs memory, CVAE fits and
  held-out evaluation (layers, options, cvae);
* :mod:`~fedpeft.adapters.icm_lora.plugin` -- the plugin (everything above); the method's
  description (paper, what travels, averaging, privacy, deviations) is its docstring.
"""
