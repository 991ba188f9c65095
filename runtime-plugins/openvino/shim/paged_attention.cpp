// The one piece of OpenVINO the C API lacks: the SDPA -> PagedAttention model
// transformation (what Python's `paged_attention_transformation` and GenAI's
// continuous batching run). A paged IR cannot be saved and read back (the IR
// reader has no PagedAttentionExtension, and exported blobs drop the node's
// rt_info), so slinfer-openvino applies it to the stateful IR at load time.
//
// Built by build.rs into a small shared library against the openvino wheel's
// headers and dlopen'ed at run time after libopenvino_c.
#include <cstring>
#include <exception>
#include <memory>

#include "openvino/core/model.hpp"
#include "openvino/pass/sdpa_to_paged_attention.hpp"

// Layout of the C API's handle (src/bindings/c/src/common.h): one shared_ptr.
struct ov_model {
    std::shared_ptr<ov::Model> object;
};

extern "C" int slinfer_ov_paged_attention(ov_model* model, char* err, size_t err_len) {
    try {
        if (model == nullptr || !model->object) {
            std::strncpy(err, "null model", err_len);
            return 1;
        }
        auto pass = std::make_shared<ov::pass::SDPAToPagedAttention>(false, false);
        pass->run_on_model(model->object);
        model->object->validate_nodes_and_infer_types();
        return 0;
    } catch (const std::exception& e) {
        std::strncpy(err, e.what(), err_len);
    } catch (...) {
        std::strncpy(err, "unknown C++ exception", err_len);
    }
    if (err_len > 0) err[err_len - 1] = 0;
    return 1;
}
