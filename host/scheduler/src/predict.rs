//! Per-function output-length history, for the predictive look-ahead: KV is
//! reserved up to a high quantile of what the function has produced before
//! instead of a fixed number of tokens past what is generated so far.

use std::collections::HashMap;

#[derive(Clone, Debug, PartialEq)]
pub struct PredictorConfig {
    /// The quantile of past output lengths to reserve for (0..=1).
    pub quantile: f64,
    /// Completions needed before the quantile replaces the fixed look-ahead.
    pub min_history: usize,
    /// Reserve at least this far past the generated tokens, so a request
    /// that outlives the prediction grows in steps instead of every token.
    pub min_lookahead_tokens: u64,
}

impl Default for PredictorConfig {
    fn default() -> Self {
        PredictorConfig {
            quantile: 0.9,
            min_history: 20,
            min_lookahead_tokens: 32,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct OutputPredictor {
    /// Sorted output lengths per function (lookups only, never iterated, so
    /// the map's order cannot leak into decisions).
    history: HashMap<u32, Vec<u64>>,
}

impl OutputPredictor {
    pub fn record(&mut self, function: u32, output_tokens: u64) {
        let h = self.history.entry(function).or_default();
        let at = h.partition_point(|&x| x <= output_tokens);
        h.insert(at, output_tokens);
    }

    /// Tokens to reserve past `generated`, or `None` while the function has
    /// too little history.
    pub fn lookahead_tokens(
        &self,
        cfg: &PredictorConfig,
        function: u32,
        generated: u64,
    ) -> Option<u64> {
        let h = self.history.get(&function)?;
        if h.len() < cfg.min_history.max(1) {
            return None;
        }
        let idx = ((h.len() - 1) as f64 * cfg.quantile.clamp(0.0, 1.0)).round() as usize;
        Some(
            h[idx]
                .saturating_sub(generated)
                .max(cfg.min_lookahead_tokens),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falls_back_until_history_then_reserves_quantile() {
        let cfg = PredictorConfig {
            quantile: 0.9,
            min_history: 10,
            min_lookahead_tokens: 8,
        };
        let mut p = OutputPredictor::default();
        for len in (1..=9).rev() {
            p.record(7, len * 10);
        }
        assert_eq!(p.lookahead_tokens(&cfg, 7, 0), None);
        p.record(7, 100);
        assert_eq!(p.lookahead_tokens(&cfg, 7, 0), Some(90));
        assert_eq!(p.lookahead_tokens(&cfg, 7, 50), Some(40));
        assert_eq!(p.lookahead_tokens(&cfg, 7, 95), Some(8));
        assert_eq!(p.lookahead_tokens(&cfg, 8, 0), None);
    }
}
