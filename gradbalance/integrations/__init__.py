"""Integrations with training frameworks, each in its own module so that ``import gradbalance``
never imports the framework: ``gradbalance.integrations.lightning`` needs
``gradbalance[lightning]``, ``.transformers`` needs ``gradbalance[transformers]``, ``.timm``
needs ``gradbalance[timm]``."""
