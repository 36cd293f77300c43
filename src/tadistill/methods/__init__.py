"""Methods that add behaviour to the training loop beyond loss terms, one file each (see training/hooks.py).

Each file defines a ``MethodHooks`` subclass and a ``build(config, parts)`` function that returns it when
a lane's config asks for the method (None otherwise); ``registry.METHODS`` lists them.
"""
