-- Named reasoning templates (SCoTER sec. 3.1 "Reasoning Pattern", App. F): an ordered list of
-- steps that guides the teacher inside <cot_path>. Jobs (`gvm compare`, distillation) read
-- them by name through factory.templates; 'discovered' names the dataset's latest mined one.
create table templates (
    name         varchar primary key,     -- two-step | three-step | five-step | paper-<dataset> | <gvm run id>
    kind         varchar not null,        -- manual | paper | discovered
    dataset      varchar,                 -- the dataset a discovered template was mined from
    steps        varchar[] not null,      -- ordered step names, first to last
    description  varchar,
    source       varchar not null,        -- where it comes from (paper section, or the gvm run)
    run_id       varchar,                 -- the gvm run that mined it
    created_at   timestamp not null default current_timestamp
);

insert into templates (name, kind, steps, description, source) values
('two-step', 'manual',
 ['User Interest Mining', 'Item Tag Prediction & Recommendation'],
 'A direct, two-stage reasoning path focusing on mining interests and then recommending (RecGPT).',
 'SCoTER App. F, Two-step Template'),
('three-step', 'manual',
 ['User Profile Summary', 'User Interest Extraction', 'Item Recommendation'],
 'Adds an explicit intermediate step for summarizing a user profile before interest extraction.',
 'SCoTER App. F, Three-step Template'),
('five-step', 'manual',
 ['Behavioral Data Analysis', 'Interest Pattern Recognition', 'Preference Trend Analysis',
  'Predictive Feature Generation', 'Targeted Item Recommendation'],
 'Breaks the analysis into distinct phases, from data analysis to feature prediction before the final recommendation.',
 'SCoTER App. F, Five-step Template'),
('paper-beauty', 'paper',
 ['Analyze sequential purchase history', 'Distinguish stable vs. recent interests',
  'Expand via shared item attributes', 'Predict high-confidence features', 'Item Recommendation'],
 'The pattern GVM discovered on Amazon Beauty in the paper (universal style).',
 'SCoTER App. F, Mined Pattern: Beauty'),
('paper-instruments', 'paper',
 ['Analyze the purchase pattern', 'Music interest inference', 'Instrument focus identification',
  'Accessory expansion', 'Feature prediction'],
 'The pattern GVM discovered on Amazon Instruments in the paper.',
 'SCoTER App. F, Mined Pattern: Instruments'),
('paper-sports', 'paper',
 ['Purchase pattern recognition', 'Outdoor/Athletic interest mapping',
  'Complementary gear expansion', 'Item Recommendation'],
 'The pattern GVM discovered on Amazon Sports and Outdoors in the paper.',
 'SCoTER App. F, Mined Pattern: Sports'),
('paper-yelp', 'paper',
 ['Purchase analysis', 'Cuisine/Location interest mapping', 'Category expansion',
  'Feature prediction'],
 'The pattern GVM discovered on Yelp in the paper.',
 'SCoTER App. F, Mined Pattern: Yelp');
