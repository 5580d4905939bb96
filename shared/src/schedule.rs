//! Cron schedules: parsing a cron expression and finding its next tick (UTC).

use std::str::FromStr;

use chrono::{DateTime, Utc};

/// A parsed cron expression: 5 fields, or 6 with seconds first.
#[derive(Debug, Clone)]
pub struct Cron(croner::Cron);

impl Cron {
    pub fn parse(expression: &str) -> Result<Cron, String> {
        croner::Cron::from_str(expression)
            .map(Cron)
            .map_err(|error| format!("invalid cron expression: {error}"))
    }

    /// The first tick strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.0.find_next_occurrence(&after, false).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks() {
        let at = DateTime::parse_from_rfc3339("2026-11-26T10:00:07Z")
            .unwrap()
            .with_timezone(&Utc);
        let every_five_seconds = Cron::parse("*/5 * * * * *").unwrap();
        assert_eq!(
            every_five_seconds.next_after(at).unwrap().to_rfc3339(),
            "2026-11-26T10:00:10+00:00"
        );
        let hourly = Cron::parse("0 * * * *").unwrap();
        assert_eq!(
            hourly.next_after(at).unwrap().to_rfc3339(),
            "2026-11-26T11:00:00+00:00"
        );
        assert!(Cron::parse("61 * * * *").is_err());
        assert!(
            Cron::parse("every tuesday")
                .unwrap_err()
                .starts_with("invalid cron expression")
        );
    }
}
