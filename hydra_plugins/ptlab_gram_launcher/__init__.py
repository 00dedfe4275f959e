"""ptlab's Hydra launcher plugin: ``hydra/launcher=ptlab_gram`` runs a sweep of gram-engine pipelines batched."""
