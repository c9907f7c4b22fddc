// An empty Python module so that `import gptfast._C` (the setup.py build) loads this library: the
// kernels themselves register with the dispatcher from static initialisers (TORCH_LIBRARY_IMPL).
// Plain Python C API rather than pybind11: torch/extension.h would add ~30 s to every build.
#include <Python.h>

#define GPTFAST_CAT_(a, b) a##b
#define GPTFAST_CAT(a, b) GPTFAST_CAT_(a, b)
#define GPTFAST_STR_(a) #a
#define GPTFAST_STR(a) GPTFAST_STR_(a)

static PyModuleDef gptfast_module = {
    PyModuleDef_HEAD_INIT, GPTFAST_STR(TORCH_EXTENSION_NAME),
    "gptfast's native kernels; use them through torch.ops.gptfast or gptfast.ops", -1, nullptr,
};

PyMODINIT_FUNC GPTFAST_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&gptfast_module); }
