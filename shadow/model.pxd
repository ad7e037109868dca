# Augments shadow/model.py when Cython compiles it (setup.py): the helpers of the write path
# become C functions, called directly rather than through Python calls (a third of a write's
# instructions went to those calls), and _Write a C class. A typed argument is checked for its
# exact type, so only what the model builds itself is typed as dict, list or tuple (states
# copied by copy_json, metadata copies, paths, operation lists); what callers pass stays
# `object` and is still checked by the Python code, refused with InvalidUpdate.

cdef class _Write:
    cdef public object writer
    cdef public object counter, ts_ms, context, seq
    cdef public list conflicting, overruled, suppressed
    cpdef list apply(self, object section, dict state, dict meta, list ops)
    cdef bint _set(self, object section, object seq, dict state, dict meta, tuple path,
                   object value) except -1
    cdef list _delete(self, object section, object seq, dict state, dict meta, tuple path)

cpdef object copy_json(object value)
cpdef bint json_equal(object a, object b) except -1
cpdef dict compute_delta(object desired, object reported)
cpdef dict bump(object vv, object writer)
cpdef dict merge_vv(object a, object b)
cpdef object check_id(object value, str what, object limits=*)
cpdef object _check_int(object value, str what)
cdef object _check_tree(object value, str where, int depth, object limits, bint nulls)
cpdef tuple parse_update(object doc, object limits=*, bint nulls=*)
cpdef object check_version(object current, object expected)
cpdef object _expected(object argument, object body)
cpdef list _patch_ops(object patch, tuple prefix=*, list ops=*)
cpdef list _affected(dict state, tuple path, bint writing)
cpdef object _set(dict state, tuple path, object value)
cpdef object _remove(dict state, tuple path)
cpdef object _nest(list ops)
cpdef object _base(object current)
cdef object _result(object base, object new, dict applied, _Write w, dict change_state,
                    bint concurrent, object client_token)
cdef object _next_shadow(object base, dict states, dict metas, dict vv, object ts_ms,
                         object limits)
