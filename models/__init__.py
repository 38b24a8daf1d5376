"""The torch customer model (event featurisation, encoder, heads, losses, training,
evaluation). Built in issue #3; nothing here yet."""
