/* Cross-entropy, loss and gradient in one pass: validation and dispatch. */
#include "validate.h"

l3k_status l3k_cross_entropy_forward_backward(const DLTensor *logits, const DLTensor *target,
                                              int64_t ignore_index, const DLTensor *grad_scale,
                                              DLTensor *loss, DLTensor *dlogits, void *stream) {
    l3k_call c = {.op = "cross_entropy_forward_backward"};
    l3k_dt dt;
    l3k_rows xr, dxr;
    L3K_TRY(l3k_check_tensor(&c, logits, "logits"));
    L3K_TRY(l3k_check_float(&c, logits, "logits", &dt));
    L3K_TRY(l3k_check_rows(&c, logits, "logits", &xr));
    if (xr.rows > 0 && xr.n == 0)
        return l3k_fail(&c, L3K_ERROR_SHAPE,
                        "logits.shape[-1] (V) is 0 with %lld rows, expected at least 1 class",
                        (long long)xr.rows);
    L3K_TRY(l3k_check_exact_dtype(&c, target, "target", (DLDataType){kDLInt, 64, 1}));
    L3K_TRY(l3k_check_packed(&c, target, "target", xr.rows));
    if (grad_scale) L3K_TRY(l3k_check_f32_vector(&c, grad_scale, "grad_scale", 1));
    L3K_TRY(l3k_check_f32_vector(&c, loss, "loss", xr.rows));
    L3K_TRY(l3k_check_tensor(&c, dlogits, "dlogits"));
    L3K_TRY(l3k_check_dtype(&c, dlogits, "dlogits", dt, "logits"));
    L3K_TRY(l3k_check_same_shape(&c, dlogits, "dlogits", logits, "logits"));
    L3K_TRY(l3k_check_rows(&c, dlogits, "dlogits", &dxr));
    /* dlogits: in place over logits (each row is read in full before it is written) or apart
     * from it; apart from the other inputs.  loss is apart from every tensor. */
    L3K_TRY(l3k_check_rows_no_overlap(&c, &dxr, "dlogits", &xr, "logits", l3k_dt_size(dt), 1));
    L3K_TRY(l3k_check_no_overlap(&c, dlogits, "dlogits", target, "target", 0));
    if (grad_scale) L3K_TRY(l3k_check_no_overlap(&c, dlogits, "dlogits", grad_scale, "grad_scale", 0));
    const DLTensor *others[4] = {logits, target, grad_scale, dlogits};
    static const char *other_names[4] = {"logits", "target", "grad_scale", "dlogits"};
    for (int i = 0; i < 4; ++i)
        if (others[i]) L3K_TRY(l3k_check_no_overlap(&c, loss, "loss", others[i], other_names[i], 0));
    if (xr.rows == 0) return L3K_SUCCESS;

    const l3k_cross_entropy_args a = {
        .rows = xr.rows,
        .n = xr.n,
        .dtype = dt,
        .logits = xr.data,
        .dlogits = dxr.data,
        .logits_stride = xr.row_stride,
        .dlogits_stride = dxr.row_stride,
        .target = (const int64_t *)l3k_data(target),
        .ignore_index = ignore_index,
        .grad_scale = grad_scale ? (const float *)l3k_data(grad_scale) : 0,
        .loss = (float *)l3k_data(loss),
    };
    return L3K_RUN_KERNEL(&c, cross_entropy, &a, stream);
}
