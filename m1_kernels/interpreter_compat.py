"""Compatibility of Triton's CPU interpreter (TRITON_INTERPRET=1) with NumPy >= 2.4.

The interpreter holds kernel scalars (program ids, loaded values) as 1-element arrays and turns them
into loop bounds with int(array), which NumPy 2.4 rejects for arrays with ndim > 0; a kernel that
loops `for i in range(lo, hi)` over bounds derived from program_id then fails on the CPU only.
`patch_triton_interpreter()` makes that conversion read the single element. Idempotent; a no-op on
Triton versions without the patched function.
"""

import functools


@functools.cache
def patch_triton_interpreter() -> None:
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor
