"""The TensorBoard tag groups, in the order a person reads them.

TensorBoard groups a run's tags by the prefix before the first ``/`` and lays the groups
out in alphabetical order. With plain names (``eval``, ``grad_norm``, ``memory``, ``moe``,
``param_norm``, ...) the loss and the LR would sit in the ninth group, below dozens of
per-layer cards. The groups a person opens first are therefore numbered, so they sort
before every named group whatever the locale:

``1_train/``  (phoenix.monitor.train_scalars)
    ``loss``, ``lr``, ``grad_norm``, ``loss_scale`` (fp16), ``consumed_tokens``,
    ``consumed_samples``, ``skipped_steps``, ``stage`` (explicit stages)
``2_datasets/``  (phoenix.monitor.dataset_loss)
    ``loss/<dataset>``, ``tokens/<dataset>``
``3_throughput/``  (train_scalars; phoenix.monitor.throughput)
    ``tokens_per_sec``, ``step_time``, ``data_time``; ``tokens_per_sec_per_gpu``,
    ``tflops_per_gpu``, ``mfu``, ``forward_backward_time``, ``optimizer_time``,
    ``logging_time``
``4_heatmaps/``  (phoenix.monitor.heatmap)
    images ``grad_norm``, ``param_norm``, ``update_norm``, ``update_ratio``,
    ``adam_m_norm``, ``adam_v_norm``, ``adam_direction_norm`` (layer x step),
    ``moe_load/layer_XX`` (expert x step), ``moe_load`` (layer x expert); text ``scale``

Then, alphabetically, the named groups: ``adam_direction_norm/<key>``, ``adam_m_norm/<key>``,
``adam_v_norm/<key>`` (phoenix.monitor.optimizer_state: Adam's state, with the keys of the
grad norms), ``eval/<set>/*`` and ``time/eval``
(phoenix.eval.callback), ``grad_norm/<key>``, ``param_norm/<key>``, ``update_norm/<key>``,
``update_ratio/<key>`` (phoenix.monitor.norms: per layer and per part of a layer),
histograms ``param_hist/<key>`` and ``grad_hist/<key>`` (phoenix.monitor.histograms),
``memory/*`` (CUDA), ``moe/*`` (phoenix.monitor.moe), ``spikes/count``. Texts: ``config``
(the resolved recipe, at each job's first step) and ``stages``.

These names are part of Phoenix's interface (dashboards, scripts, tests read them): a tag
is renamed only with a note in the docs' monitoring page.
"""

TRAIN = "1_train"
DATASETS = "2_datasets"
THROUGHPUT = "3_throughput"
HEATMAPS = "4_heatmaps"
