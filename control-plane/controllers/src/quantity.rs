//! Resource quantities (`100m`, `1.5Gi`, `2e3`) as integers: CPU in millicores, everything
//! else in base units.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// The value of a quantity, or `None` when it does not parse.
pub fn value(q: &Quantity) -> Option<f64> {
    let s = q.0.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0f64.powi(4),
        "Pi" => 1024.0f64.powi(5),
        "Ei" => 1024.0f64.powi(6),
        e if e.starts_with(['e', 'E']) => 10f64.powi(e[1..].parse().ok()?),
        _ => return None,
    };
    Some(n * factor)
}

/// CPU in millicores, rounded up.
pub fn millis(q: &Quantity) -> Option<i64> {
    value(q).map(|v| (v * 1000.0).ceil() as i64)
}

/// A count or size in base units (bytes for memory), rounded up.
pub fn units(q: &Quantity) -> Option<i64> {
    value(q).map(|v| v.ceil() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Quantity {
        Quantity(s.into())
    }

    #[test]
    fn parses_the_usual_forms() {
        assert_eq!(millis(&q("100m")), Some(100));
        assert_eq!(millis(&q("2")), Some(2000));
        assert_eq!(millis(&q("0.5")), Some(500));
        assert_eq!(units(&q("1Gi")), Some(1 << 30));
        assert_eq!(units(&q("128Mi")), Some(128 << 20));
        assert_eq!(units(&q("1k")), Some(1000));
        assert_eq!(units(&q("2e3")), Some(2000));
        assert_eq!(units(&q("110")), Some(110));
        assert_eq!(units(&q("12Zi")), None);
        assert_eq!(units(&q("")), None);
    }
}
