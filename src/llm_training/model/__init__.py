"""The decoder-only transformer and text generation, and the text-and-image model built on it."""


def build_model(cfg, images: bool = False):
    """The config's language model, or with ``images`` the one that reads an image before its text."""
    if images:
        from llm_training.model.vision import ImageCaptionModel

        return ImageCaptionModel(cfg.model, cfg.vision)
    from llm_training.model.transformer import Transformer

    return Transformer(cfg.model)
