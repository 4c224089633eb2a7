//! The price table and exact cost computation (`src/prices.rs`,
//! `config/prices.toml`).
//!
//! Every expected cost is a literal worked out by hand, in nano-dollars, with
//! the arithmetic in a comment. Per-token prices in nano-dollars, from the
//! shipped table (input / output / 5m write / 1h write / cache read):
//!
//! - Opus 4.5–4.8:          5000 / 25000 /  6250 / 10000 /  500
//! - Opus 4, 4.1, 3:       15000 / 75000 / 18750 / 30000 / 1500
//! - Sonnet 3.5–4.6:        3000 / 15000 /  3750 /  6000 /  300
//! - Sonnet 4, 4.5 > 200k:  6000 / 22500 /  7500 / 12000 /  600
//! - Haiku 4.5:             1000 /  5000 /  1250 /  2000 /  100
//! - Haiku 3.5:              800 /  4000 /  1000 /  1600 /   80
//! - Haiku 3:                250 /  1250 /   300 /   500 /   30  (written out)
//! - web search: 10,000,000 per request ($10 / 1,000).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tollgate::config::PricesConfig;
use tollgate::meter::Usage;
use tollgate::prices::{
    CostQuery, MatchKind, PriceError, PriceTable, Pricer, is_long_context_beta, load_configured,
};

const SHIPPED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/prices.toml");

/// No usage at all; cases spell out only what they set.
const ZERO: Usage = Usage {
    input_tokens: 0,
    output_tokens: 0,
    cache_creation_input_tokens: 0,
    cache_creation_5m_tokens: None,
    cache_creation_1h_tokens: None,
    cache_read_input_tokens: 0,
    web_search_requests: 0,
    service_tier: None,
    inference_geo: None,
};

fn batch() -> Option<String> {
    Some("batch".to_owned())
}

fn geo(region: &str) -> Option<String> {
    Some(region.to_owned())
}

struct Case {
    name: &'static str,
    model: &'static str,
    /// The request carried `anthropic-beta: context-1m-2025-08-07`.
    beta: bool,
    usage: Usage,
    expected: Option<i64>,
}

fn shipped() -> PriceTable {
    match PriceTable::load(Path::new(SHIPPED)) {
        Ok(table) => table,
        Err(e) => panic!("the shipped price table does not load: {e}"),
    }
}

/// Prices every case and reports all mismatches at once.
fn check(table: &PriceTable, cases: &[Case]) {
    let mut failures = Vec::new();
    for case in cases {
        let got = table.cost(&CostQuery {
            model: case.model,
            usage: &case.usage,
            long_context_beta: case.beta,
        });
        if got != case.expected {
            failures.push(format!(
                "{}: {} priced {got:?}, expected {:?}",
                case.name, case.model, case.expected
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn shipped_table_prices_one_million_sonnet_input_tokens_at_three_dollars() {
    check(
        &shipped(),
        &[Case {
            name: "1M input",
            model: "claude-sonnet-4-5-20250929",
            beta: false,
            usage: Usage {
                input_tokens: 1_000_000,
                ..ZERO
            },
            // 1,000,000 × 3000 = $3.00
            expected: Some(3_000_000_000),
        }],
    );
}

#[test]
fn each_token_category_is_priced() {
    let s = "claude-sonnet-4-5";
    check(
        &shipped(),
        &[
            Case {
                name: "input",
                model: s,
                beta: false,
                usage: Usage {
                    input_tokens: 1_000,
                    ..ZERO
                },
                // 1000 × 3000
                expected: Some(3_000_000),
            },
            Case {
                name: "output",
                model: s,
                beta: false,
                usage: Usage {
                    output_tokens: 1_000,
                    ..ZERO
                },
                // 1000 × 15000
                expected: Some(15_000_000),
            },
            Case {
                name: "5m write, split",
                model: s,
                beta: false,
                usage: Usage {
                    cache_creation_input_tokens: 1_000,
                    cache_creation_5m_tokens: Some(1_000),
                    cache_creation_1h_tokens: Some(0),
                    ..ZERO
                },
                // 1000 × 3750
                expected: Some(3_750_000),
            },
            Case {
                name: "1h write, split",
                model: s,
                beta: false,
                usage: Usage {
                    cache_creation_input_tokens: 1_000,
                    cache_creation_5m_tokens: Some(0),
                    cache_creation_1h_tokens: Some(1_000),
                    ..ZERO
                },
                // 1000 × 6000
                expected: Some(6_000_000),
            },
            Case {
                name: "mixed split",
                model: s,
                beta: false,
                usage: Usage {
                    cache_creation_input_tokens: 1_000,
                    cache_creation_5m_tokens: Some(400),
                    cache_creation_1h_tokens: Some(600),
                    ..ZERO
                },
                // 400 × 3750 + 600 × 6000 = 1,500,000 + 3,600,000
                expected: Some(5_100_000),
            },
            Case {
                name: "no split: all 5m",
                model: s,
                beta: false,
                usage: Usage {
                    cache_creation_input_tokens: 1_000,
                    ..ZERO
                },
                // 1000 × 3750
                expected: Some(3_750_000),
            },
            Case {
                name: "split without 5m figure: the rest is 5m",
                model: s,
                beta: false,
                usage: Usage {
                    cache_creation_input_tokens: 1_000,
                    cache_creation_1h_tokens: Some(600),
                    ..ZERO
                },
                // (1000 − 600) × 3750 + 600 × 6000 = 1,500,000 + 3,600,000
                expected: Some(5_100_000),
            },
            Case {
                name: "split short of the total: the rest is 5m",
                model: s,
                beta: false,
                usage: Usage {
                    cache_creation_input_tokens: 1_000,
                    cache_creation_5m_tokens: Some(100),
                    cache_creation_1h_tokens: Some(600),
                    ..ZERO
                },
                // max(100, 1000 − 600) × 3750 + 600 × 6000 = 1,500,000 + 3,600,000
                expected: Some(5_100_000),
            },
            Case {
                name: "cache read",
                model: s,
                beta: false,
                usage: Usage {
                    cache_read_input_tokens: 1_000,
                    ..ZERO
                },
                // 1000 × 300
                expected: Some(300_000),
            },
            Case {
                name: "a typical cached streaming turn",
                model: "claude-sonnet-4-5-20250929",
                beta: false,
                usage: Usage {
                    input_tokens: 12,
                    output_tokens: 512,
                    cache_creation_input_tokens: 2_048,
                    cache_creation_5m_tokens: Some(2_048),
                    cache_creation_1h_tokens: Some(0),
                    cache_read_input_tokens: 10_000,
                    service_tier: Some("standard".to_owned()),
                    ..ZERO
                },
                // 12 × 3000 + 512 × 15000 + 2048 × 3750 + 10000 × 300
                // = 36,000 + 7,680,000 + 7,680,000 + 3,000,000
                expected: Some(18_396_000),
            },
        ],
    );
}

#[test]
fn every_model_family_has_its_list_price() {
    // 1000 input + 1000 output tokens each.
    let io = || Usage {
        input_tokens: 1_000,
        output_tokens: 1_000,
        ..ZERO
    };
    let case = |name, model, expected| Case {
        name,
        model,
        beta: false,
        usage: io(),
        expected,
    };
    check(
        &shipped(),
        &[
            // 1000 × 5000 + 1000 × 25000 = 30,000,000
            case("Opus 4.8", "claude-opus-4-8", Some(30_000_000)),
            case("Opus 4.7", "claude-opus-4-7", Some(30_000_000)),
            case("Opus 4.6", "claude-opus-4-6", Some(30_000_000)),
            case(
                "Opus 4.5 dated",
                "claude-opus-4-5-20251101",
                Some(30_000_000),
            ),
            case("Opus 4.5 alias", "claude-opus-4-5", Some(30_000_000)),
            // 1000 × 15000 + 1000 × 75000 = 90,000,000
            case(
                "Opus 4.1 dated",
                "claude-opus-4-1-20250805",
                Some(90_000_000),
            ),
            case("Opus 4.1 alias", "claude-opus-4-1", Some(90_000_000)),
            case("Opus 4 dated", "claude-opus-4-20250514", Some(90_000_000)),
            case("Opus 4 alias", "claude-opus-4-0", Some(90_000_000)),
            case(
                "Opus 3 (legacy)",
                "claude-3-opus-20240229",
                Some(90_000_000),
            ),
            case("Opus 3 latest", "claude-3-opus-latest", Some(90_000_000)),
            // 1000 × 3000 + 1000 × 15000 = 18,000,000
            case("Sonnet 4.6", "claude-sonnet-4-6", Some(18_000_000)),
            case(
                "Sonnet 4.5 dated",
                "claude-sonnet-4-5-20250929",
                Some(18_000_000),
            ),
            case(
                "Sonnet 4 dated",
                "claude-sonnet-4-20250514",
                Some(18_000_000),
            ),
            case("Sonnet 4 alias", "claude-sonnet-4-0", Some(18_000_000)),
            case(
                "Sonnet 3.7 dated",
                "claude-3-7-sonnet-20250219",
                Some(18_000_000),
            ),
            case(
                "Sonnet 3.7 latest",
                "claude-3-7-sonnet-latest",
                Some(18_000_000),
            ),
            case(
                "Sonnet 3.5 (legacy)",
                "claude-3-5-sonnet-20241022",
                Some(18_000_000),
            ),
            // 1000 × 1000 + 1000 × 5000 = 6,000,000
            case("Haiku 4.5 alias", "claude-haiku-4-5", Some(6_000_000)),
            case(
                "Haiku 4.5 dated",
                "claude-haiku-4-5-20251001",
                Some(6_000_000),
            ),
            // 1000 × 800 + 1000 × 4000 = 4,800,000
            case("Haiku 3.5", "claude-3-5-haiku-20241022", Some(4_800_000)),
            // 1000 × 250 + 1000 × 1250 = 1,500,000
            case("Haiku 3", "claude-3-haiku-20240307", Some(1_500_000)),
        ],
    );
}

#[test]
fn cache_prices_follow_each_family() {
    // 1000 tokens each of 5m write, 1h write and cache read.
    let caches = || Usage {
        cache_creation_input_tokens: 2_000,
        cache_creation_5m_tokens: Some(1_000),
        cache_creation_1h_tokens: Some(1_000),
        cache_read_input_tokens: 1_000,
        ..ZERO
    };
    let case = |name, model, expected| Case {
        name,
        model,
        beta: false,
        usage: caches(),
        expected,
    };
    check(
        &shipped(),
        &[
            // 1000 × (6250 + 10000 + 500)
            case("Opus 4.5", "claude-opus-4-5", Some(16_750_000)),
            // 1000 × (18750 + 30000 + 1500)
            case("Opus 4.1", "claude-opus-4-1", Some(50_250_000)),
            // 1000 × (3750 + 6000 + 300)
            case("Sonnet 3.7", "claude-3-7-sonnet-latest", Some(10_050_000)),
            // 1000 × (1250 + 2000 + 100)
            case("Haiku 4.5", "claude-haiku-4-5", Some(3_350_000)),
            // 1000 × (1000 + 1600 + 80)
            case("Haiku 3.5", "claude-3-5-haiku-latest", Some(2_680_000)),
            // Haiku 3's list cache prices are written out, not 1.25× / 2× / 0.1×:
            // 1000 × (300 + 500 + 30)
            case("Haiku 3", "claude-3-haiku-20240307", Some(830_000)),
        ],
    );
}

#[test]
fn batch_halves_every_token_category_but_not_web_search() {
    check(
        &shipped(),
        &[
            Case {
                name: "batch input + output",
                model: "claude-sonnet-4-5",
                beta: false,
                usage: Usage {
                    input_tokens: 1_000,
                    output_tokens: 1_000,
                    service_tier: batch(),
                    ..ZERO
                },
                // (1000 × 3000 + 1000 × 15000) × 0.5
                expected: Some(9_000_000),
            },
            Case {
                name: "batch caches",
                model: "claude-haiku-4-5",
                beta: false,
                usage: Usage {
                    input_tokens: 100,
                    output_tokens: 100,
                    cache_creation_input_tokens: 100,
                    cache_read_input_tokens: 1_000,
                    service_tier: batch(),
                    ..ZERO
                },
                // (100 × 1000 + 100 × 5000 + 100 × 1250 + 1000 × 100) × 0.5
                // = 825,000 × 0.5
                expected: Some(412_500),
            },
            Case {
                name: "batch Haiku 3 cache read",
                model: "claude-3-haiku-20240307",
                beta: false,
                usage: Usage {
                    cache_read_input_tokens: 1_001,
                    service_tier: batch(),
                    ..ZERO
                },
                // 1001 × 30 × 0.5
                expected: Some(15_015),
            },
            Case {
                name: "standard tier is full price",
                model: "claude-sonnet-4-5",
                beta: false,
                usage: Usage {
                    input_tokens: 1_000,
                    service_tier: Some("standard".to_owned()),
                    ..ZERO
                },
                // 1000 × 3000
                expected: Some(3_000_000),
            },
            Case {
                name: "priority tier is list price",
                model: "claude-sonnet-4-5",
                beta: false,
                usage: Usage {
                    input_tokens: 1_000,
                    service_tier: Some("priority".to_owned()),
                    ..ZERO
                },
                // 1000 × 3000
                expected: Some(3_000_000),
            },
            Case {
                name: "web search is a flat fee in batch",
                model: "claude-sonnet-4-5",
                beta: false,
                usage: Usage {
                    input_tokens: 1_000,
                    web_search_requests: 1,
                    service_tier: batch(),
                    ..ZERO
                },
                // 1000 × 3000 × 0.5 + 1 × 10,000,000
                expected: Some(11_500_000),
            },
        ],
    );
}

#[test]
fn long_context_premium_applies_above_200k_with_the_beta_on_sonnet_4_and_4_5() {
    let s = "claude-sonnet-4-5-20250929";
    check(
        &shipped(),
        &[
            Case {
                name: "above",
                model: s,
                beta: true,
                usage: Usage {
                    input_tokens: 200_001,
                    output_tokens: 1_000,
                    ..ZERO
                },
                // 200,001 × 6000 + 1000 × 22500 = 1,200,006,000 + 22,500,000
                expected: Some(1_222_506_000),
            },
            Case {
                name: "exactly at the threshold",
                model: s,
                beta: true,
                usage: Usage {
                    input_tokens: 200_000,
                    output_tokens: 1_000,
                    ..ZERO
                },
                // 200,000 × 3000 + 1000 × 15000 = 600,000,000 + 15,000,000
                expected: Some(615_000_000),
            },
            Case {
                name: "below",
                model: s,
                beta: true,
                usage: Usage {
                    input_tokens: 199_999,
                    output_tokens: 1_000,
                    ..ZERO
                },
                // 199,999 × 3000 + 1000 × 15000 = 599,997,000 + 15,000,000
                expected: Some(614_997_000),
            },
            Case {
                name: "cache tokens push it over",
                model: s,
                beta: true,
                usage: Usage {
                    input_tokens: 100_000,
                    output_tokens: 1_000,
                    cache_creation_input_tokens: 1,
                    cache_read_input_tokens: 100_000,
                    ..ZERO
                },
                // total input 100,000 + 100,000 + 1 = 200,001 > 200,000:
                // 100,000 × 6000 + 100,000 × 600 + 1 × 7500 + 1000 × 22500
                // = 600,000,000 + 60,000,000 + 7,500 + 22,500,000
                expected: Some(682_507_500),
            },
            Case {
                name: "cache tokens up to exactly the threshold",
                model: s,
                beta: true,
                usage: Usage {
                    input_tokens: 100_000,
                    output_tokens: 1_000,
                    cache_read_input_tokens: 100_000,
                    ..ZERO
                },
                // total input 200,000, standard price:
                // 100,000 × 3000 + 100,000 × 300 + 1000 × 15000
                expected: Some(345_000_000),
            },
            Case {
                name: "1h writes count and take the long-context base",
                model: s,
                beta: true,
                usage: Usage {
                    input_tokens: 150_000,
                    cache_creation_input_tokens: 50_001,
                    cache_creation_5m_tokens: Some(0),
                    cache_creation_1h_tokens: Some(50_001),
                    ..ZERO
                },
                // total 200,001: 150,000 × 6000 + 50,001 × 12000 = 900,000,000 + 600,012,000
                expected: Some(1_500_012_000),
            },
            Case {
                name: "without the beta header",
                model: s,
                beta: false,
                usage: Usage {
                    input_tokens: 300_000,
                    output_tokens: 1_000,
                    ..ZERO
                },
                // 300,000 × 3000 + 1000 × 15000
                expected: Some(915_000_000),
            },
            Case {
                name: "Sonnet 4",
                model: "claude-sonnet-4-20250514",
                beta: true,
                usage: Usage {
                    input_tokens: 300_000,
                    output_tokens: 1_000,
                    ..ZERO
                },
                // 300,000 × 6000 + 1000 × 22500 = 1,800,000,000 + 22,500,000
                expected: Some(1_822_500_000),
            },
            Case {
                name: "Sonnet 4 alias",
                model: "claude-sonnet-4-0",
                beta: true,
                usage: Usage {
                    input_tokens: 300_000,
                    output_tokens: 1_000,
                    ..ZERO
                },
                // as above
                expected: Some(1_822_500_000),
            },
            Case {
                name: "long context in batch",
                model: s,
                beta: true,
                usage: Usage {
                    input_tokens: 300_000,
                    output_tokens: 1_000,
                    service_tier: batch(),
                    ..ZERO
                },
                // (300,000 × 6000 + 1000 × 22500) × 0.5 = 1,822,500,000 × 0.5
                expected: Some(911_250_000),
            },
            Case {
                name: "not on Opus 4.5",
                model: "claude-opus-4-5-20251101",
                beta: true,
                usage: Usage {
                    input_tokens: 300_000,
                    output_tokens: 1_000,
                    ..ZERO
                },
                // 300,000 × 5000 + 1000 × 25000 = 1,500,000,000 + 25,000,000
                expected: Some(1_525_000_000),
            },
            Case {
                name: "not on Sonnet 4.6",
                model: "claude-sonnet-4-6",
                beta: true,
                usage: Usage {
                    input_tokens: 300_000,
                    output_tokens: 1_000,
                    ..ZERO
                },
                // 300,000 × 3000 + 1000 × 15000
                expected: Some(915_000_000),
            },
        ],
    );
}

#[test]
fn us_only_inference_costs_more_on_opus_4_6_and_newer_only() {
    let io = |region: Option<String>| Usage {
        input_tokens: 1_000,
        output_tokens: 1_000,
        inference_geo: region,
        ..ZERO
    };
    let case = |name, model, region: Option<String>, expected| Case {
        name,
        model,
        beta: false,
        usage: io(region),
        expected,
    };
    let mut cases = vec![
        // (1000 × 5000 + 1000 × 25000) × 1.1 = 30,000,000 × 1.1
        case(
            "Opus 4.6 us",
            "claude-opus-4-6",
            geo("us"),
            Some(33_000_000),
        ),
        case(
            "Opus 4.7 us",
            "claude-opus-4-7",
            geo("us"),
            Some(33_000_000),
        ),
        case(
            "Opus 4.8 us",
            "claude-opus-4-8",
            geo("us"),
            Some(33_000_000),
        ),
        // 1000 × 5000 + 1000 × 25000
        case(
            "Opus 4.6 global",
            "claude-opus-4-6",
            geo("global"),
            Some(30_000_000),
        ),
        case("Opus 4.6 no geo", "claude-opus-4-6", None, Some(30_000_000)),
        case(
            "Opus 4.5 us",
            "claude-opus-4-5-20251101",
            geo("us"),
            Some(30_000_000),
        ),
        // 1000 × 3000 + 1000 × 15000
        case(
            "Sonnet 4.5 us",
            "claude-sonnet-4-5",
            geo("us"),
            Some(18_000_000),
        ),
        case(
            "Sonnet 4.6 us",
            "claude-sonnet-4-6",
            geo("us"),
            Some(18_000_000),
        ),
    ];
    cases.push(Case {
        name: "every category",
        model: "claude-opus-4-6",
        beta: false,
        usage: Usage {
            input_tokens: 1_000,
            output_tokens: 1_000,
            cache_creation_input_tokens: 2_000,
            cache_creation_5m_tokens: Some(1_000),
            cache_creation_1h_tokens: Some(1_000),
            cache_read_input_tokens: 1_000,
            inference_geo: geo("us"),
            ..ZERO
        },
        // 1000 × (5000 + 25000 + 6250 + 10000 + 500) × 1.1 = 46,750,000 × 1.1
        expected: Some(51_425_000),
    });
    cases.push(Case {
        name: "us in batch",
        model: "claude-opus-4-6",
        beta: false,
        usage: Usage {
            service_tier: batch(),
            ..io(geo("us"))
        },
        // 30,000,000 × 1.1 × 0.5
        expected: Some(16_500_000),
    });
    cases.push(Case {
        name: "web search is a flat fee for us-only",
        model: "claude-opus-4-6",
        beta: false,
        usage: Usage {
            web_search_requests: 1,
            inference_geo: geo("us"),
            ..ZERO
        },
        // 1 × 10,000,000
        expected: Some(10_000_000),
    });
    check(&shipped(), &cases);
}

#[test]
fn cost_is_rounded_once_half_up_to_the_nano_dollar() {
    // Opus 4.6, batch, US-only: a 5m write is 6250 × 1.1 × 0.5 = 3437.5 per token.
    let writes = |n| Usage {
        cache_creation_input_tokens: n,
        service_tier: batch(),
        inference_geo: geo("us"),
        ..ZERO
    };
    let case = |name, tokens, expected| Case {
        name,
        model: "claude-opus-4-6",
        beta: false,
        usage: writes(tokens),
        expected,
    };
    check(
        &shipped(),
        &[
            // 3437.5 rounds up
            case("one token", 1, Some(3_438)),
            // 6875 exactly: rounding happens once on the total, not per token
            case("two tokens", 2, Some(6_875)),
            // 10312.5 rounds up
            case("three tokens", 3, Some(10_313)),
        ],
    );
}

#[test]
fn web_search_is_ten_dollars_per_thousand() {
    check(
        &shipped(),
        &[
            Case {
                name: "search only",
                model: "claude-sonnet-4-5",
                beta: false,
                usage: Usage {
                    web_search_requests: 3,
                    ..ZERO
                },
                // 3 × $0.01
                expected: Some(30_000_000),
            },
            Case {
                name: "search and tokens",
                model: "claude-sonnet-4-5",
                beta: false,
                usage: Usage {
                    input_tokens: 1_000,
                    output_tokens: 500,
                    web_search_requests: 2,
                    ..ZERO
                },
                // 1000 × 3000 + 500 × 15000 + 2 × 10,000,000
                expected: Some(30_500_000),
            },
        ],
    );
}

#[test]
fn unknown_models_are_unpriced_never_guessed() {
    let some = || Usage {
        input_tokens: 1,
        ..ZERO
    };
    let case = |name, model, usage, expected| Case {
        name,
        model,
        beta: false,
        usage,
        expected,
    };
    check(
        &shipped(),
        &[
            case("another vendor", "gpt-4o", some(), None),
            case("a future Sonnet", "claude-sonnet-4-7", some(), None),
            // "claude-opus-4-1" must not cover a future "claude-opus-4-10".
            case("prefix stops at a digit", "claude-opus-4-10", some(), None),
            case("no such family alias", "claude-opus-4", some(), None),
            case("empty name", "", some(), None),
            // A request that used nothing (an error answer) costs nothing,
            // whatever model it named.
            case("unknown model, no usage", "gpt-4o", ZERO, Some(0)),
            case("known model, no usage", "claude-haiku-4-5", ZERO, Some(0)),
            // 1 × 1000
            case(
                "a known model still prices",
                "claude-haiku-4-5",
                some(),
                Some(1_000),
            ),
        ],
    );
}

#[test]
fn absurd_counts_never_wrap() {
    let huge = Usage {
        input_tokens: u64::MAX,
        output_tokens: u64::MAX,
        ..ZERO
    };
    let large = Usage {
        input_tokens: 1_000_000_000_000,
        ..ZERO
    };
    check(
        &shipped(),
        &[
            Case {
                name: "u64::MAX tokens",
                model: "claude-opus-4-1",
                beta: false,
                usage: huge,
                expected: None,
            },
            Case {
                name: "a trillion tokens",
                model: "claude-sonnet-4-5",
                beta: false,
                usage: large,
                // 10^12 × 3000 = $3,000,000
                expected: Some(3_000_000_000_000_000),
            },
        ],
    );
}

/// A small table for the matching and validation tests.
const RULES: &str = r#"
[rules]
cache_write_5m_multiplier = "1.25"
cache_write_1h_multiplier = "2"
cache_read_multiplier = "0.1"
batch_multiplier = "0.5"
us_only_multiplier = "1.1"
web_search_per_1000 = "10"
long_context_threshold_tokens = 200000
"#;

fn table(models: &str) -> PriceTable {
    match PriceTable::from_toml_str(&format!("{RULES}{models}")) {
        Ok(t) => t,
        Err(e) => panic!("test table does not load: {e}"),
    }
}

#[test]
fn exact_id_first_then_longest_prefix() {
    let t = table(
        r#"
[models."claude-opus-4"]
match = "prefix"
input = 15
output = 75

[models."claude-opus-4-5"]
match = "prefix"
input = 5
output = 25

[models."claude-opus-4-5-special"]
input = "1"
output = "1"

[models."vendor-"]
match = "prefix"
input = "0.5"
output = "0.5"
"#,
    );
    let io = || Usage {
        input_tokens: 1_000,
        output_tokens: 1_000,
        ..ZERO
    };
    let case = |name, model, expected| Case {
        name,
        model,
        beta: false,
        usage: io(),
        expected,
    };
    check(
        &t,
        &[
            // 1000 × 5000 + 1000 × 25000: the longer prefix wins
            case("dated 4.5", "claude-opus-4-5-20251101", Some(30_000_000)),
            case("4.5 itself", "claude-opus-4-5", Some(30_000_000)),
            // 1000 × 15000 + 1000 × 75000: the shorter prefix catches the rest
            case("dated 4.1", "claude-opus-4-1-20250805", Some(90_000_000)),
            // 1000 × 1000 + 1000 × 1000: exact entry
            case("exact", "claude-opus-4-5-special", Some(2_000_000)),
            // an exact entry does not act as a prefix: back to "claude-opus-4-5"
            case(
                "exact is not a prefix",
                "claude-opus-4-5-special-2",
                Some(30_000_000),
            ),
            // "claude-opus-4" stops at a word boundary
            case("boundary", "claude-opus-45", None),
            // a prefix ending in "-" covers whatever follows
            // 1000 × 500 + 1000 × 500
            case("dash prefix", "vendor-x9", Some(1_000_000)),
        ],
    );
    let entry = t
        .price_for("claude-opus-4-5-20251101")
        .map(|p| (p.key().to_owned(), p.match_kind()));
    assert_eq!(
        entry,
        Some(("claude-opus-4-5".to_owned(), MatchKind::Prefix))
    );
    let entry = t
        .price_for("claude-opus-4-5-special")
        .map(|p| (p.key().to_owned(), p.match_kind()));
    assert_eq!(
        entry,
        Some(("claude-opus-4-5-special".to_owned(), MatchKind::Exact))
    );
    assert!(t.price_for("claude-3-opus").is_none());
}

#[test]
fn shipped_entries_resolve_to_the_intended_keys() {
    let t = shipped();
    for (model, key) in [
        ("claude-opus-4-5-20251101", "claude-opus-4-5"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1"),
        ("claude-opus-4-20250514", "claude-opus-4-20250514"),
        ("claude-3-5-haiku-20241022", "claude-3-5-haiku"),
        ("claude-3-haiku-20240307", "claude-3-haiku"),
        ("claude-3-7-sonnet-latest", "claude-3-7-sonnet"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4-20250514"),
    ] {
        assert_eq!(t.price_for(model).map(|p| p.key()), Some(key), "{model}");
    }
    let legacy = |m| t.price_for(m).is_some_and(|p| p.is_legacy());
    assert!(legacy("claude-3-opus-20240229"));
    assert!(legacy("claude-3-5-sonnet-20240620"));
    assert!(!legacy("claude-sonnet-4-5"));
    let us = |m| t.price_for(m).is_some_and(|p| p.has_us_only_premium());
    assert!(us("claude-opus-4-6") && us("claude-opus-4-7") && us("claude-opus-4-8"));
    assert!(!us("claude-opus-4-5") && !us("claude-sonnet-4-6") && !us("claude-haiku-4-5"));
    let long = |m| t.price_for(m).is_some_and(|p| p.long_context().is_some());
    assert!(
        long("claude-sonnet-4-5") && long("claude-sonnet-4-20250514") && long("claude-sonnet-4-0")
    );
    assert!(!long("claude-sonnet-4-6") && !long("claude-opus-4-6"));
}

#[test]
fn rates_are_exact_atto_dollars_per_token() {
    let t = shipped();
    let Some(haiku) = t.price_for("claude-haiku-4-5") else {
        panic!("no Haiku 4.5")
    };
    let r = haiku.standard();
    // $1/MTok = 1e-6 USD = 1e12 atto-dollars per token; 1.25×, 2×, 0.1× of that.
    assert_eq!(
        (
            r.input,
            r.output,
            r.cache_write_5m,
            r.cache_write_1h,
            r.cache_read
        ),
        (
            1_000_000_000_000,
            5_000_000_000_000,
            1_250_000_000_000,
            2_000_000_000_000,
            100_000_000_000
        )
    );
}

#[test]
fn version_is_the_sha256_prefix_of_the_file_bytes() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let path = dir.path().join("prices.toml");
    let first = format!("{RULES}[models.\"m\"]\ninput = \"1\"\noutput = \"2\"\n");
    std::fs::write(&path, &first).unwrap_or_else(|e| panic!("write: {e}"));
    let loaded = PriceTable::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let expected = hex::encode(Sha256::digest(first.as_bytes()));
    assert_eq!(loaded.version(), &expected[..12]);
    assert_eq!(loaded.version().len(), 12);

    // Any change, even a comment, is a new version.
    let second = format!("# prices as of today\n{first}");
    std::fs::write(&path, &second).unwrap_or_else(|e| panic!("write: {e}"));
    let reloaded = PriceTable::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(reloaded.version(), loaded.version());
    assert_eq!(
        reloaded.version(),
        &hex::encode(Sha256::digest(second.as_bytes()))[..12]
    );

    // The same bytes given as a string have the same version.
    let inline = PriceTable::from_toml_str(&first).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(inline.version(), loaded.version());
}

#[test]
fn builtin_table_is_the_shipped_file() {
    let builtin = PriceTable::builtin().unwrap_or_else(|e| panic!("{e}"));
    let bytes = std::fs::read(SHIPPED).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        builtin.version(),
        &hex::encode(Sha256::digest(&bytes))[..12]
    );
    assert_eq!(builtin.version(), shipped().version());
}

/// The message of a table that must fail to load.
fn rejection(text: &str) -> String {
    match PriceTable::from_toml_str(text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn invalid_tables_are_refused_with_a_clear_error() {
    let cases: &[(&str, String, &[&str])] = &[
        ("not TOML", "[rules\n".to_owned(), &["(inline)"]),
        (
            "missing output",
            format!("{RULES}[models.\"m\"]\ninput = \"1\"\n"),
            &["missing field", "output"],
        ),
        (
            "missing rules",
            "[models.\"m\"]\ninput = \"1\"\noutput = \"1\"\n".to_owned(),
            &["rules"],
        ),
        (
            "missing a rule",
            RULES.replace("batch_multiplier = \"0.5\"\n", "")
                + "[models.\"m\"]\ninput = 1\noutput = 1\n",
            &["batch_multiplier"],
        ),
        (
            "unknown key",
            format!("{RULES}[models.\"m\"]\ninput = \"1\"\noutput = \"1\"\ninptu = \"1\"\n"),
            &["inptu"],
        ),
        (
            "float price",
            format!("{RULES}[models.\"m\"]\ninput = 0.8\noutput = \"1\"\n"),
            &["float", "\"0.8\""],
        ),
        (
            "bad match",
            format!("{RULES}[models.\"m\"]\nmatch = \"fuzzy\"\ninput = 1\noutput = 1\n"),
            &["fuzzy", "prefix"],
        ),
        ("no models", format!("{RULES}[models]\n"), &["at least one"]),
        (
            "every bad value is listed",
            format!(
                "{RULES}[models.\"a\"]\ninput = \"-1\"\noutput = \"1.5x\"\n\
                 [models.\"b\"]\ninput = \"0.0000000001\"\noutput = \"1\"\n"
            ),
            &[
                "models.\"a\".input",
                "negative",
                "models.\"a\".output",
                "models.\"b\".input",
                "decimal places",
            ],
        ),
        (
            "long context needs both prices",
            format!("{RULES}[models.\"m\"]\ninput = 3\noutput = 15\nlong_context_input = 6\n"),
            &["long_context_input and long_context_output"],
        ),
        (
            "long context with cache overrides",
            format!(
                "{RULES}[models.\"m\"]\ninput = 3\noutput = 15\ncache_read = \"0.2\"\n\
                 long_context_input = 6\nlong_context_output = \"22.5\"\n"
            ),
            &["cannot also override cache prices"],
        ),
        (
            "multiplier with too many decimals",
            RULES.replace("\"1.1\"", "\"1.0001\"") + "[models.\"m\"]\ninput = 1\noutput = 1\n",
            &["rules.us_only_multiplier", "3 decimal places"],
        ),
        (
            "absurd price",
            format!("{RULES}[models.\"m\"]\ninput = \"2000000\"\noutput = 1\n"),
            &["above the limit"],
        ),
    ];
    let mut failures = Vec::new();
    for (name, text, needles) in cases {
        let message = rejection(text);
        for needle in needles.iter() {
            if !message.contains(needle) {
                failures.push(format!("{name}: {needle:?} not in:\n{message}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn load_errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let missing = dir.path().join("nope.toml");
    let err = PriceTable::load(&missing)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("nope.toml"), "{err}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!("{RULES}[models.\"m\"]\ninput = \"x\"\noutput = 1\n"),
    )
    .unwrap_or_else(|e| panic!("write: {e}"));
    match PriceTable::load(&bad) {
        Err(e @ PriceError::Invalid { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("bad.toml") && text.contains("models.\"m\".input"),
                "{text}"
            );
        }
        other => panic!("expected an Invalid error, got {other:?}"),
    }
}

#[test]
fn long_context_beta_is_found_in_the_header_list() {
    assert!(is_long_context_beta("context-1m-2025-08-07"));
    assert!(is_long_context_beta(
        "prompt-caching-2024-07-31, context-1m-2025-08-07"
    ));
    assert!(!is_long_context_beta("context-1m-2025-08-07x"));
    assert!(!is_long_context_beta(""));
}

/// Collects log output so a test can count warnings.
#[derive(Clone, Default)]
struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn unpriced_total(registry: &prometheus::Registry) -> Option<u64> {
    registry
        .gather()
        .iter()
        .find(|f| f.name() == "tollgate_unpriced_requests_total")
        .map(|f| f.get_metric()[0].get_counter().get_value() as u64)
}

#[test]
fn pricer_counts_every_unpriced_request_and_warns_once_per_model() {
    let registry = prometheus::Registry::new();
    let pricer = Pricer::new(shipped(), &registry).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(unpriced_total(&registry), Some(0));

    let logs = LogCapture::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let used = Usage {
        input_tokens: 10,
        ..ZERO
    };
    let price = |model| {
        pricer.cost(&CostQuery {
            model,
            usage: &used,
            long_context_beta: false,
        })
    };
    let costs = tracing::subscriber::with_default(subscriber, || {
        [
            price("mystery-1"),
            price("mystery-1"),
            price("mystery-2"),
            price("claude-haiku-4-5"),
        ]
    });
    // 10 × 1000 for the Haiku request
    assert_eq!(costs, [None, None, None, Some(10_000)]);
    assert_eq!(unpriced_total(&registry), Some(3));

    let text = String::from_utf8(logs.0.lock().unwrap_or_else(|p| p.into_inner()).clone())
        .unwrap_or_default();
    assert_eq!(text.matches("mystery-1").count(), 1, "{text}");
    assert_eq!(text.matches("mystery-2").count(), 1, "{text}");
    assert_eq!(pricer.version(), shipped().version());
}

#[test]
fn configured_table_loads_with_its_metric() {
    let registry = prometheus::Registry::new();
    let config = PricesConfig {
        file: PathBuf::from(SHIPPED),
    };
    let pricer = load_configured(&config, &registry).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pricer.version(), shipped().version());
    assert_eq!(unpriced_total(&registry), Some(0));

    // A second pricer on the same registry is a clear error, not a panic.
    assert!(matches!(
        load_configured(&config, &registry),
        Err(PriceError::Metrics(_))
    ));

    let missing = PricesConfig {
        file: PathBuf::from("/nonexistent/prices.toml"),
    };
    let err = load_configured(&missing, &prometheus::Registry::new())
        .err()
        .map(|e| e.to_string());
    assert!(err.is_some_and(|e| e.contains("/nonexistent/prices.toml")));
}

#[test]
fn a_flood_of_unknown_names_is_counted_but_logged_only_up_to_a_cap() {
    let registry = prometheus::Registry::new();
    let pricer = Pricer::new(shipped(), &registry).unwrap_or_else(|e| panic!("{e}"));
    let logs = LogCapture::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let used = Usage {
        input_tokens: 1,
        ..ZERO
    };
    tracing::subscriber::with_default(subscriber, || {
        for round in 0..2 {
            for n in 0..300 {
                let model = format!("invented-{n}");
                let cost = pricer.cost(&CostQuery {
                    model: &model,
                    usage: &used,
                    long_context_beta: false,
                });
                assert_eq!(cost, None, "round {round}");
            }
        }
    });
    assert_eq!(unpriced_total(&registry), Some(600));
    let text = String::from_utf8(logs.0.lock().unwrap_or_else(|p| p.into_inner()).clone())
        .unwrap_or_default();
    // 256 names get their own warning, then one notice, whatever follows.
    assert_eq!(text.matches("model has no price").count(), 256, "{text}");
    assert_eq!(text.matches("but not logged").count(), 1, "{text}");
}
