"""Fused sweeps (``hydra/launcher=fused``): a sweep's distillation jobs that read the same batches and
the same teacher train together in one process, one loader and one teacher pass per batch, each
student bit-identical to its run alone (:mod:`kdseg.fused.group`, :mod:`kdseg.fused.feed`,
:mod:`kdseg.fused.launch`)."""
