"""torch 2.13's grouped fully_shard hooks put back to their semantics before pytorch#180426/#180428 (torch 2.11, the
GPU machine's), on CPU: the group pre-hook gathers only for the first of its modules to run while the set of modules
still to run is empty; that set is emptied only when all of them ran (or in the last backward's final callback); the
root's post-forward does not finish a group that ran in part. Private torch internals: for this bench only."""
from torch.autograd.graph import _MultiHandle
import torch.distributed.fsdp._fully_shard._fsdp_state as _state


def _old_group_hooks(modules, pre_hook, post_hook, modules_to_run, cast_output_dtype=None):
    modules_set = set(modules)

    def wrapped_pre_hook(*args, **kwargs):
        if len(modules_to_run) == 0:
            modules_to_run.update(modules_set)
            return pre_hook(*args, **kwargs)

    def post_for(module):
        def wrapped_post_hook(*args, **kwargs):
            modules_to_run.discard(module)
            if len(modules_to_run) == 0:
                return post_hook(*args, **kwargs)
        return wrapped_post_hook

    pre = [m.register_forward_pre_hook(wrapped_pre_hook, prepend=True, with_kwargs=True) for m in modules]
    post = [m.register_forward_hook(post_for(m), prepend=False, always_call=True) for m in modules]
    return _MultiHandle(tuple(pre + post))


def install() -> None:
    _state._register_group_forward_hooks = _old_group_hooks
    _state.FSDPState._force_complete_incomplete_states = lambda self, output: output
