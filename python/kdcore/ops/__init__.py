"""Registered torch.library ops: one module per op family.

Each module defines the custom op (its schema, fake implementation and
autograd formula), the backends it dispatches to, and the public function.
"""
