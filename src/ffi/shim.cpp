// Exception barrier between Rust and llama.cpp.
//
// llama.cpp is C++: its C API can throw (std::bad_alloc when an allocation fails, std::
// length_error, its own std::runtime_error), and a C++ exception that reaches Rust frames
// aborts the process ("Rust cannot catch foreign exceptions"). Each function here makes one
// llama.cpp call inside try/catch and turns an exception into a status code, with the
// exception's message kept per thread for `qf_last_error`. GGML_ASSERT calls abort() and
// cannot be caught: src/ffi/gguf_check.rs refuses the inputs known to reach one.

#include <cstdint>
#include <exception>
#include <new>
#include <string>

#include "llama.h"

namespace {

thread_local std::string last_error;

// 0: no exception; 1: out of memory; 2: any other exception.
template <typename F> int guarded(F && f) {
    try {
        f();
        return 0;
    } catch (const std::bad_alloc &) {
        last_error = "out of memory (std::bad_alloc)";
        return 1;
    } catch (const std::exception & e) {
        last_error = e.what();
        return 2;
    } catch (...) {
        last_error = "unknown C++ exception";
        return 2;
    }
}

} // namespace

extern "C" {

const char * qf_last_error(void) { return last_error.c_str(); }

int qf_tokenize(const llama_vocab * vocab, const char * text, int32_t text_len, llama_token * tokens,
                int32_t n_tokens_max, bool add_special, bool parse_special, int32_t * result) {
    return guarded([&] {
        *result = llama_tokenize(vocab, text, text_len, tokens, n_tokens_max, add_special, parse_special);
    });
}

int qf_token_to_piece(const llama_vocab * vocab, llama_token token, char * buf, int32_t length,
                      int32_t lstrip, bool special, int32_t * result) {
    return guarded([&] { *result = llama_token_to_piece(vocab, token, buf, length, lstrip, special); });
}

int qf_model_load_from_file(const char * path, llama_model_params params, llama_model ** result) {
    return guarded([&] { *result = llama_model_load_from_file(path, params); });
}

int qf_init_from_model(llama_model * model, llama_context_params params, llama_context ** result) {
    return guarded([&] { *result = llama_init_from_model(model, params); });
}

int qf_decode(llama_context * ctx, llama_batch batch, int32_t * result) {
    return guarded([&] { *result = llama_decode(ctx, batch); });
}

int qf_chat_apply_template(const char * tmpl, const llama_chat_message * chat, size_t n_msg, bool add_ass,
                           char * buf, int32_t length, int32_t * result) {
    return guarded([&] { *result = llama_chat_apply_template(tmpl, chat, n_msg, add_ass, buf, length); });
}

int qf_sampler_init_grammar(const llama_vocab * vocab, const char * grammar_str, const char * grammar_root,
                            llama_sampler ** result) {
    return guarded([&] { *result = llama_sampler_init_grammar(vocab, grammar_str, grammar_root); });
}

int qf_sampler_sample(llama_sampler * smpl, llama_context * ctx, int32_t idx, llama_token * result) {
    return guarded([&] { *result = llama_sampler_sample(smpl, ctx, idx); });
}

} // extern "C"
