"""Import-only stub of sgl_kernel for sglang's CPU engine on machines without the CPU kernel build (bench/compare.py's
autoregressive baseline). Any attribute or submodule resolves to a placeholder; calling one raises NotImplementedError.
Copied from reference/cpu_feasibility.md: on a CPU without AMX sglang only imports these names and never calls them.
"""
import importlib.abc, importlib.machinery, sys, types
__version__ = "0.0.0+stub"

class _Placeholder:
    def __init__(self, name): self._name = name
    def __getattr__(self, a):
        if a.startswith("__"): raise AttributeError(a)
        return _Placeholder(f"{self._name}.{a}")
    def __call__(self, *a, **k): raise NotImplementedError(f"{self._name}: sgl_kernel stub")
    def __mro_entries__(self, bases): return (object,)
    def __repr__(self): return f"<sgl_kernel stub {self._name}>"

class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"): raise AttributeError(name)
        return _Placeholder(f"{self.__name__}.{name}")

class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("sgl_kernel."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
    def create_module(self, spec):
        m = _StubModule(spec.name); m.__path__ = []; return m
    def exec_module(self, module): pass

sys.meta_path.insert(0, _Finder())
sys.modules[__name__].__class__ = _StubModule
