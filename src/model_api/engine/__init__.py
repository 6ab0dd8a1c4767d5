"""Model engines; :mod:`.base` is the interface the rest of the app sees."""
