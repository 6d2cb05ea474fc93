"""Integrations with training frameworks, each in its own module so that ``import gradbalance``
never imports the framework: ``gradbalance.integrations.timm`` needs ``gradbalance[timm]``."""
