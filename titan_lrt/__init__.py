"""titan_lrt: pretraining of Latent Recurrent Transformers."""
