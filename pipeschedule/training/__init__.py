"""The kit for a training loop, built only on the public API (:mod:`pipeschedule`).

Process-group layout (:mod:`~pipeschedule.training.layout`), tied embeddings
(:mod:`~pipeschedule.training.tied`), data parallelism over chunks
(:mod:`~pipeschedule.training.data_parallel`), mixed precision and loss scaling
(:mod:`~pipeschedule.training.mixed`), gradient clipping (:mod:`~pipeschedule.training.clip`),
checkpoints (:mod:`~pipeschedule.training.checkpoint`), loss reporting, layer partitioning, and the
GPT of the main job (:mod:`~pipeschedule.training.models`). Nothing below the public API is
imported here: what a training loop needs is what a user's loop can use.
"""
