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
#include "openvino/op/constant.hpp"
#include "openvino/op/gather.hpp"
#include "openvino/op/matmul.hpp"
#include "openvino/op/parameter.hpp"
#include "openvino/pass/sdpa_to_paged_attention.hpp"

// Compute logits only for the rows the caller samples (as GenAI's
// apply_gather_before_matmul_transformation does): a Gather on the token axis
// of the hidden states before the final MatMul, fed by a new input
// `sampled_tokens_indices` [?] i64. Without it a prefill of N tokens makes N
// vocab-sized rows. Returns whether it applied (only the plain
// MatMul -> Result shape is recognised).
static bool gather_before_lm_head(const std::shared_ptr<ov::Model>& model) {
    if (model->get_results().size() != 1) return false;
    auto last = model->get_results()[0]->input_value(0).get_node_shared_ptr();
    auto matmul = ov::as_type_ptr<ov::op::v0::MatMul>(last);
    if (!matmul || matmul->get_transpose_a()) return false;
    auto hidden = matmul->input_value(0);
    if (hidden.get_partial_shape().rank().is_dynamic()) return false;
    auto indices = std::make_shared<ov::op::v0::Parameter>(ov::element::i64, ov::PartialShape{-1});
    indices->set_friendly_name("sampled_tokens_indices");
    indices->output(0).get_tensor().set_names({"sampled_tokens_indices"});
    auto axis = ov::op::v0::Constant::create(ov::element::i64, ov::Shape{}, {0});
    auto gather = std::make_shared<ov::op::v8::Gather>(hidden, indices, axis);
    matmul->input(0).replace_source_output(gather);
    model->add_parameters({indices});
    return true;
}

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
        gather_before_lm_head(model->object);
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
