"""Task types: what is learned -- data, model and head, collation, loss, metrics (the seam).

:mod:`fedpeft.tasks.base` declares the interface, :mod:`fedpeft.tasks.seq_cls` is sequence
classification (the default), :mod:`fedpeft.tasks.registry` maps ``task_type`` names to them.
Everything else -- the trainer, the round loop, the adapter plugins, the simulators and the
reports -- reaches the task only through a :class:`~fedpeft.tasks.base.TaskType`, so batches
are opaque to them and the metrics they record are the task type's.

How to add a task type (``tests/test_tasks.py`` defines one, ``TextScore``, and runs it
through training, DP-SGD and whole federation rounds):

1. subclass :class:`~fedpeft.tasks.base.TaskType` in a module of this package; set ``name``,
   ``head_prefixes`` (top-level modules trained in full beside the adapter), ``peft_task_type``,
   ``target_key`` and ``metric_names`` (the first is the primary metric; ``higher_is_better``);
2. implement ``load_data``, ``build_model`` (initialise new heads from ``head_seed``),
   ``encode`` (all examples as one named batch padded to ``max_length``), ``eval_batches``,
   ``example_loss`` (one value per example: what DP-SGD clips), ``evaluate`` and ``head_memory``;
3. register an instance in :mod:`fedpeft.tasks.registry` and run with ``task_type = "<name>"``
   (``--task <name>``).
"""
