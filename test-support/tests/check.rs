//! The greedy check itself (`reference::check`) on the default model: it
//! accepts GenAI's own answers and a real near-tie flip, and refuses a wrong
//! token, a wrong word, a stop where the model would go on and a miscount,
//! each with an error that says where.
//!
//! Needs what `./dev test` sets up: the default model and the virtualenv.

use slinfer_test_support::default_model_dir;
use slinfer_test_support::reference::{self, Answer, Finish};

const PROMPT: &str = "The capital of France is";

#[test]
fn the_check_accepts_greedy_answers_and_near_ties_and_refuses_the_rest() {
    let model = default_model_dir();
    let r = &reference::generate(&model, &[PROMPT], 24)[0];
    let mut wrong = r.tokens.clone();
    wrong[3] = 1000; // "()"
    let answers = [
        Answer::tokens(PROMPT, &r.tokens),
        Answer::text(PROMPT, &r.text),
        // What GenAI's continuous batching answered on an Intel Xeon with AMX
        // where LLMPipeline answered " Paris.\n\nThe answer": " population"
        // is 0.22 logits below " answer" in f32.
        Answer::text(PROMPT, " Paris.\n\nThe population of France"),
        Answer::tokens(PROMPT, &wrong),
        Answer::text(PROMPT, " Paris.\n\nThe banana"),
        Answer::text(PROMPT, " Paris.\n\nThe").ended(Finish::Stop, 5),
        Answer::text(PROMPT, " Paris.\n\nThe").ended(Finish::Length, 9),
    ];
    let v = reference::check(&model, &answers);
    assert!(v[0].ok && v[0].near_ties.is_empty(), "{:?}", v[0]);
    assert_eq!(v[0].steps, 24);
    assert!(v[1].ok && v[1].near_ties.is_empty(), "{:?}", v[1]);
    assert!(v[2].ok, "{:?}", v[2]);
    let tie = &v[2].near_ties[0];
    assert_eq!(
        (tie.piece.as_str(), tie.best_piece.as_str()),
        (" population", " answer")
    );
    assert!(tie.gap > 0.0 && tie.gap < reference::NEAR_TIE_LOGITS);

    let error = |i: usize| {
        assert!(!v[i].ok, "answer {i} passed: {:?}", v[i]);
        v[i].error.clone().unwrap()
    };
    assert!(
        error(3).starts_with("token 1000 ('()') is not a greedy choice at step 3"),
        "{}",
        error(3)
    );
    assert!(
        error(4).contains("no greedy token continues the answer with ' banana'"),
        "{}",
        error(4)
    );
    assert!(
        error(5).contains("end-of-sequence is not a greedy choice"),
        "{}",
        error(5)
    );
    assert!(
        error(6).contains("the server reported 9 tokens; the answer is 5"),
        "{}",
        error(6)
    );
}
