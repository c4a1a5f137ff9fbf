"""Adapters that plug expman into training frameworks; each is imported on its own.

    from expman.integrations.lightning import ExpmanLogger        # pip install 'expman[lightning]'
    from expman.integrations.transformers import ExpmanCallback   # pip install 'expman[transformers]'

This package imports nothing itself, so `import expman` never pulls in torch or a framework.
"""
