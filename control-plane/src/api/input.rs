//! Checks on input that serde's types alone cannot express: text lengths, SKUs that
//! PostgreSQL's BIGINT can hold, page sizes. Each returns an [`ApiError`] (400) naming the
//! field, so a handler refuses bad input before it touches the database.

use super::error::ApiError;

/// Characters a name may have, at most (the schema's CHECK says the same).
pub const NAME_CHARS_MAX: usize = 200;
/// Characters an idempotency key may have, at most.
pub const KEY_CHARS_MAX: usize = 200;
/// Characters a reason may have, at most.
pub const REASON_CHARS_MAX: usize = 1_000;
/// Items a page holds when the client does not say.
pub const PAGE_LIMIT_DEFAULT: u32 = 100;
/// Items a page may hold, at most.
pub const PAGE_LIMIT_MAX: u32 = 1_000;
/// The largest change of stock one adjustment may ask for, either way, and the largest
/// on-hand figure a set may ask for.
pub const STOCK_UNITS_MAX: i64 = 1_000_000_000;

/// Refuses a text that is empty, longer than `chars_max` characters, or holds a control
/// character (names and keys are shown to people and used in logs).
pub fn input_text(field: &str, value: &str, chars_max: usize) -> Result<(), ApiError> {
    let chars = value.chars().count();
    if chars == 0 {
        return Err(ApiError::invalid(format!("{field} must not be empty")));
    }
    if chars > chars_max {
        return Err(ApiError::invalid(format!("{field} must be at most {chars_max} characters, not {chars}")));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!("{field} must not contain control characters")));
    }
    Ok(())
}

/// Refuses a free-text reason that is too long or holds a NUL (which PostgreSQL's TEXT
/// cannot store); an empty reason is fine, and so are line breaks.
pub fn input_reason(value: &str) -> Result<(), ApiError> {
    let chars = value.chars().count();
    if chars > REASON_CHARS_MAX {
        return Err(ApiError::invalid(format!("reason must be at most {REASON_CHARS_MAX} characters, not {chars}")));
    }
    if value.contains('\0') {
        return Err(ApiError::invalid("reason must not contain NUL characters"));
    }
    Ok(())
}

/// Refuses a SKU above `i64::MAX`: the books store SKUs as BIGINT.
pub fn input_sku(field: &str, sku: u64) -> Result<(), ApiError> {
    if sku > i64::MAX as u64 {
        return Err(ApiError::invalid(format!("{field} must be at most {} (it is {sku})", i64::MAX)));
    }
    Ok(())
}

/// The page size asked for, or the default; refuses 0 and sizes above the maximum.
pub fn input_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    match limit {
        None => Ok(PAGE_LIMIT_DEFAULT),
        Some(limit) if (1..=PAGE_LIMIT_MAX).contains(&limit) => Ok(limit),
        Some(limit) => Err(ApiError::invalid(format!("limit must be between 1 and {PAGE_LIMIT_MAX}, not {limit}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_are_bounded_and_printable() {
        assert!(input_text("name", "north", NAME_CHARS_MAX).is_ok());
        assert!(input_text("name", "", NAME_CHARS_MAX).is_err());
        assert!(input_text("name", &"é".repeat(200), NAME_CHARS_MAX).is_ok());
        assert!(input_text("name", &"é".repeat(201), NAME_CHARS_MAX).is_err());
        assert!(input_text("name", "a\0b", NAME_CHARS_MAX).is_err());
        assert!(input_reason("").is_ok());
        assert!(input_reason("line\nbreak").is_ok());
        assert!(input_reason("a\0").is_err());
    }

    #[test]
    fn skus_and_limits_are_bounded() {
        assert!(input_sku("sku", i64::MAX as u64).is_ok());
        assert!(input_sku("sku", i64::MAX as u64 + 1).is_err());
        assert_eq!(input_limit(None), Ok(PAGE_LIMIT_DEFAULT));
        assert_eq!(input_limit(Some(PAGE_LIMIT_MAX)), Ok(PAGE_LIMIT_MAX));
        assert!(input_limit(Some(0)).is_err());
        assert!(input_limit(Some(PAGE_LIMIT_MAX + 1)).is_err());
    }
}
