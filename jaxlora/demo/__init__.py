"""The embedded demo: a made-up world, its pretrained base model and its finetuning task (`build`)."""
